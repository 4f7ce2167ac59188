"""Per-backend speed: what the project does differently on a kind of device to run faster,
chosen explicitly by the step builders."""
