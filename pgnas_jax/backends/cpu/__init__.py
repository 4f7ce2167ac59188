"""Speed on the CPU, in one place: ``kernels`` (oneDNN convolutions and one-pass BatchNorm
sums as XLA FFI calls, built on first use, each geometry self-checked), ``ops`` (the
interceptor a step builder installs to run a traced step's layers on them),
``xla_options`` (XLA:CPU compiler options of the train step) and ``host_devices`` (how a
process splits its CPU into XLA devices, ``--cpu_devices``)."""
