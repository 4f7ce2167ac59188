// The CPU train step's kernels as XLA FFI handlers, built and loaded by
// pgnas_jax/cpu_kernels.py:
//  * 2-D convolutions through oneDNN: the forward pass, the gradient of the input and the
//    gradient of the kernel. Activations NHWC and kernels HWIO in float32, as
//    pgnas_jax/layers.py lays them out; SAME-style padding given explicitly.
//  * BatchNorm's per-channel sums: sum(a) and sum(a * b) over every row in one pass.
#include <omp.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, stride, dilation, pad_top, pad_bottom, pad_left,
      pad_right, groups;

  std::string key(const char* kind) const {
    std::string k = kind;
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, stride, dilation, pad_top, pad_bottom,
                      pad_left, pad_right, groups})
      k += "," + std::to_string(v);
    return k;
  }
  dnnl::memory::desc src() const { return {{n, c, h, w}, dt::f32, tag::nhwc}; }
  dnnl::memory::desc dst() const { return {{n, o, oh, ow}, dt::f32, tag::nhwc}; }
  // The kernel as the project holds it (HWIO; with feature groups the O axis is group-major,
  // so HWIO is oneDNN's hwigo), or in the layout the primitive chooses.
  dnnl::memory::desc weights(bool given) const {
    if (groups == 1) return {{o, c, kh, kw}, dt::f32, given ? tag::hwio : tag::any};
    return {{groups, o / groups, c / groups, kh, kw}, dt::f32, given ? tag::hwigo : tag::any};
  }
  dnnl::memory::dims strides() const { return {stride, stride}; }
  dnnl::memory::dims dilates() const { return {dilation - 1, dilation - 1}; }
  dnnl::memory::dims pad_l() const { return {pad_top, pad_left}; }
  dnnl::memory::dims pad_r() const { return {pad_bottom, pad_right}; }
};

Geometry geometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                  ffi::Span<const int64_t> y, int64_t stride, int64_t dilation,
                  int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                  int64_t groups) {
  return Geometry{x[0],      x[1],       x[2],     x[3],      kernel[0], kernel[1],
                  kernel[3], y[1],       y[2],     stride,    dilation,  pad_top,
                  pad_bottom, pad_left, pad_right, groups};
}

dnnl::engine& engine() {
  static dnnl::engine cpu(dnnl::engine::kind::cpu, 0);
  return cpu;
}

// Every call brings its own scratchpad: XLA may run two calls of one primitive at once
// (two devices, or independent ops of one program), and they must not share one.
dnnl::primitive_attr attributes() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc forward_desc(const Geometry& g) {
  return {engine(),         dnnl::prop_kind::forward_training,
          dnnl::algorithm::convolution_direct,
          g.src(),          g.weights(false),
          g.dst(),          g.strides(),
          g.dilates(),      g.pad_l(),
          g.pad_r(),        attributes()};
}

// The descriptor of a backward primitive (input or kernel gradient), hinted by the forward's.
template <typename Desc>
Desc backward_desc(const Geometry& g) {
  return Desc(engine(), dnnl::algorithm::convolution_direct, g.src(), g.weights(false), g.dst(),
              g.strides(), g.dilates(), g.pad_l(), g.pad_r(), forward_desc(g), attributes());
}

// A primitive is created (and its kernel generated) once per shape and kind.
struct Primitive {
  dnnl::primitive primitive;
  dnnl::memory::desc kernel;  // the primitive's own kernel layout
  dnnl::memory::desc scratchpad;
};

template <typename Make>
const Primitive& cached(const std::string& key, Make make) {
  static std::mutex mutex;
  static std::unordered_map<std::string, Primitive> primitives;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = primitives.find(key);
  if (it == primitives.end()) it = primitives.emplace(key, make()).first;
  return it->second;
}

template <typename Run>
ffi::Error guarded(int64_t threads, Run run) {
  omp_set_num_threads(static_cast<int>(threads));
  try {
    run();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

// Runs a primitive that reads the kernel (forward, input gradient): the given HWIO kernel is
// first reordered into the primitive's layout. `in` and `out` are the activations' roles.
void run_with_kernel(const Geometry& g, const Primitive& p, const float* kernel, int in_arg,
                     const dnnl::memory::desc& in_desc, const float* in, int out_arg,
                     const dnnl::memory::desc& out_desc, float* out) {
  dnnl::stream stream(engine());
  dnnl::memory input(in_desc, engine(), const_cast<float*>(in));
  dnnl::memory output(out_desc, engine(), out);
  dnnl::memory given(g.weights(true), engine(), const_cast<float*>(kernel));
  dnnl::memory weights(p.kernel, engine());
  dnnl::memory scratchpad(p.scratchpad, engine());
  dnnl::reorder(given, weights).execute(stream, given, weights);
  p.primitive.execute(stream, {{in_arg, input},
                               {DNNL_ARG_WEIGHTS, weights},
                               {out_arg, output},
                               {DNNL_ARG_SCRATCHPAD, scratchpad}});
  stream.wait();
}

}  // namespace

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t dilation,
                   int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                   int64_t groups, int64_t threads) {
  Geometry g = geometry(x.dimensions(), kernel.dimensions(), y->dimensions(), stride,
                        dilation, pad_top, pad_bottom, pad_left, pad_right, groups);
  return guarded(threads, [&] {
    const Primitive& p = cached(g.key("forward"), [&] {
      auto pd = forward_desc(g);
      return Primitive{dnnl::convolution_forward(pd), pd.weights_desc(), pd.scratchpad_desc()};
    });
    run_with_kernel(g, p, kernel.typed_data(), DNNL_ARG_SRC, g.src(), x.typed_data(),
                    DNNL_ARG_DST, g.dst(), y->typed_data());
  });
}

ffi::Error InputGradient(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t dilation,
                         int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                         int64_t pad_right, int64_t groups, int64_t threads) {
  Geometry g = geometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride,
                        dilation, pad_top, pad_bottom, pad_left, pad_right, groups);
  return guarded(threads, [&] {
    const Primitive& p = cached(g.key("input_gradient"), [&] {
      auto pd = backward_desc<dnnl::convolution_backward_data::primitive_desc>(g);
      return Primitive{dnnl::convolution_backward_data(pd), pd.weights_desc(),
                       pd.scratchpad_desc()};
    });
    run_with_kernel(g, p, kernel.typed_data(), DNNL_ARG_DIFF_DST, g.dst(), dy.typed_data(),
                    DNNL_ARG_DIFF_SRC, g.src(), dx->typed_data());
  });
}

ffi::Error KernelGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride,
                          int64_t dilation, int64_t pad_top, int64_t pad_bottom,
                          int64_t pad_left, int64_t pad_right, int64_t groups,
                          int64_t threads) {
  Geometry g = geometry(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride,
                        dilation, pad_top, pad_bottom, pad_left, pad_right, groups);
  return guarded(threads, [&] {
    const Primitive& p = cached(g.key("kernel_gradient"), [&] {
      auto pd = backward_desc<dnnl::convolution_backward_weights::primitive_desc>(g);
      return Primitive{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
                       pd.scratchpad_desc()};
    });
    dnnl::stream stream(engine());
    dnnl::memory src(g.src(), engine(), x.typed_data());
    dnnl::memory diff_dst(g.dst(), engine(), dy.typed_data());
    dnnl::memory diff_weights(p.kernel, engine());
    dnnl::memory given(g.weights(true), engine(), dkernel->typed_data());
    dnnl::memory scratchpad(p.scratchpad, engine());
    p.primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                 {DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
    dnnl::reorder(diff_weights, given).execute(stream, diff_weights, given);
    stream.wait();
  });
}

// Per channel c, over the rows r of a and b (every axis but the last):
// sums[0][c] = sum_r a[r][c] and sums[1][c] = sum_r a[r][c] * (b[r][c] - center[c]),
// accumulated in double in row order.
ffi::Error ChannelSums(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::F32> center, ffi::ResultBuffer<ffi::F32> sums) {
  const int64_t channels = center.element_count();
  const int64_t rows = channels ? a.element_count() / channels : 0;
  const float* pa = a.typed_data();
  const float* pb = b.typed_data();
  const float* pc = center.typed_data();
  std::vector<double> plain(channels, 0.0), products(channels, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* ra = pa + r * channels;
    const float* rb = pb + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      plain[c] += ra[c];
      products[c] += static_cast<double>(ra[c]) * (static_cast<double>(rb[c]) - pc[c]);
    }
  }
  float* out = sums->typed_data();
  for (int64_t c = 0; c < channels; ++c) {
    out[c] = static_cast<float>(plain[c]);
    out[channels + c] = static_cast<float>(products[c]);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(pgnas_channel_sums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define PGNAS_CONVOLUTION_BINDING                                              \
  ffi::Ffi::Bind()                                                             \
      .Arg<ffi::Buffer<ffi::F32>>()                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                            \
      .Ret<ffi::Buffer<ffi::F32>>()                                            \
      .Attr<int64_t>("stride")                                                 \
      .Attr<int64_t>("dilation")                                               \
      .Attr<int64_t>("pad_top")                                                \
      .Attr<int64_t>("pad_bottom")                                             \
      .Attr<int64_t>("pad_left")                                               \
      .Attr<int64_t>("pad_right")                                              \
      .Attr<int64_t>("groups")                                                 \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(pgnas_convolution_forward, Forward, PGNAS_CONVOLUTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(pgnas_convolution_input_gradient, InputGradient,
                              PGNAS_CONVOLUTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(pgnas_convolution_kernel_gradient, KernelGradient,
                              PGNAS_CONVOLUTION_BINDING);
