// The CPU train step's kernels as XLA FFI handlers, built and loaded by
// pgnas_jax/cpu_kernels.py:
//  * 2-D convolutions through oneDNN: the forward pass, the gradient of the input and the
//    gradient of the kernel. Activations NHWC and kernels HWIO in float32, as
//    pgnas_jax/layers.py lays them out; SAME-style padding given explicitly.
//  * BatchNorm's per-channel sums: sum(a) and sum(a * b) over every row in one pass.
// A convolution call with the attribute `checked` set hands oneDNN a fenced copy of every
// buffer (Fenced below) and fails, naming the buffer, when the primitive wrote outside one
// of them or into an input: the run's one-time self-check and the tests call them so.
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
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

  std::string key(const char* kind, int64_t threads) const {
    std::string k = std::string(kind) + "," + std::to_string(threads);
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

// A primitive is created (and its kernel generated) once per shape, kind and thread count:
// oneDNN sizes its scratchpad for the threads it may use.
struct Primitive {
  dnnl::primitive primitive;
  std::string implementation;  // oneDNN's name for the kernel it chose
  dnnl::memory::desc in, out;  // the activations it reads and writes, as it wants them
  dnnl::memory::desc kernel;   // the primitive's own kernel layout
  dnnl::memory::desc scratchpad;
};

template <typename Kind>
Primitive primitive(const typename Kind::primitive_desc& pd, const dnnl::memory::desc& in,
                    const dnnl::memory::desc& out, const dnnl::memory::desc& kernel) {
  return Primitive{Kind(pd), pd.impl_info_str(), in, out, kernel, pd.scratchpad_desc()};
}

// oneDNN's error for a primitive that needs other buffers than XLA gives, or that wrote
// outside them in a checked call.
struct Misbehaved : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A buffer fenced by canary bytes on both sides, and unmapped pages beyond them. The data
// start is 64-byte aligned (oneDNN's alignment) and no more, so code that aligns a pointer
// up further than that, and has not booked the room, runs into the canaries.
class Fenced {
 public:
  Fenced(size_t bytes, const void* contents) : bytes_(bytes) {
    const size_t page = sysconf(_SC_PAGESIZE);
    const size_t inner = (2 * kCanary + kShift + bytes + page - 1) / page * page;
    total_ = inner + 2 * page;
    void* base = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<unsigned char*>(base);
    mprotect(base_, page, PROT_NONE);
    mprotect(base_ + page + inner, page, PROT_NONE);
    lo_ = base_ + page;
    hi_ = base_ + page + inner;
    std::memset(lo_, kPattern, inner);
    data_ = lo_ + kCanary + kShift;
    if (contents) std::memcpy(data_, contents, bytes);
  }
  ~Fenced() { munmap(base_, total_); }
  Fenced(const Fenced&) = delete;
  Fenced& operator=(const Fenced&) = delete;
  void* data() { return data_; }
  // Bytes written before (negative) or after the buffer; 0 when the canaries are intact.
  int64_t overrun() const {
    for (const unsigned char* p = lo_; p < data_; ++p)
      if (*p != kPattern) return -static_cast<int64_t>(data_ - p);
    for (const unsigned char* p = hi_ - 1; p >= data_ + bytes_; --p)
      if (*p != kPattern) return static_cast<int64_t>(p - data_ - bytes_ + 1);
    return 0;
  }

 private:
  static constexpr size_t kCanary = 16384, kShift = 64;
  static constexpr unsigned char kPattern = 0xA5;
  size_t bytes_, total_;
  unsigned char *base_, *lo_, *hi_, *data_;
};

// The buffers of one call. Unchecked, oneDNN works on XLA's buffers and allocates its own;
// checked, on fenced copies, which `verify` checks and copies back to XLA's outputs.
class Buffers {
 public:
  explicit Buffers(bool checked) : checked_(checked) {}
  dnnl::memory input(const char* name, const dnnl::memory::desc& desc, const void* data) {
    return add(name, desc, const_cast<void*>(data), true);
  }
  dnnl::memory output(const char* name, const dnnl::memory::desc& desc, void* data) {
    return add(name, desc, data, false);
  }
  dnnl::memory own(const char* name, const dnnl::memory::desc& desc) {
    return add(name, desc, nullptr, false);
  }
  // Checked: throws Misbehaved unless `p` kept to its buffers, then fills XLA's outputs.
  void verify(const Primitive& p) {
    for (Entry& e : entries_) {
      const int64_t overrun = e.fenced->overrun();
      if (overrun)
        throw Misbehaved(p.implementation + " wrote " +
                         std::to_string(overrun < 0 ? -overrun : overrun) + " bytes " +
                         (overrun < 0 ? "before" : "past") + " its " + e.name + " buffer");
      if (e.input && std::memcmp(e.fenced->data(), e.xla, e.bytes))
        throw Misbehaved(p.implementation + " wrote into its input " + e.name);
    }
    for (Entry& e : entries_)
      if (!e.input && e.xla) std::memcpy(e.xla, e.fenced->data(), e.bytes);
  }

 private:
  struct Entry {
    std::string name;
    std::unique_ptr<Fenced> fenced;
    void* xla;
    size_t bytes;
    bool input;
  };
  dnnl::memory add(const char* name, const dnnl::memory::desc& desc, void* xla, bool input) {
    if (!checked_) return xla ? dnnl::memory(desc, engine(), xla) : dnnl::memory(desc, engine());
    const size_t bytes = desc.get_size();
    entries_.push_back({name, std::make_unique<Fenced>(bytes, input ? xla : nullptr), xla,
                        bytes, input});
    return dnnl::memory(desc, engine(), entries_.back().fenced->data());
  }
  bool checked_;
  std::vector<Entry> entries_;
};

// The primitive must want XLA's plain layout of a buffer, and XLA's buffer must hold it.
void expect(const Primitive& p, const char* name, const dnnl::memory::desc& wanted,
            const dnnl::memory::desc& plain, size_t bytes) {
  if (wanted != plain)
    throw Misbehaved(p.implementation + " wants its " + name + " in another layout");
  if (plain.get_size() != bytes)
    throw Misbehaved(p.implementation + " wants " + std::to_string(plain.get_size()) +
                     " bytes of " + name + ", XLA holds " + std::to_string(bytes));
}

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
  } catch (const Misbehaved& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN's ") + e.what());
  }
  return ffi::Error::Success();
}

// Runs a primitive that reads the kernel (forward, input gradient): the given HWIO kernel is
// first reordered into the primitive's layout. `in` and `out` are the activations' roles.
void run_with_kernel(const Geometry& g, const Primitive& p, ffi::Buffer<ffi::F32> kernel,
                     int in_arg, ffi::Buffer<ffi::F32> in, int out_arg,
                     ffi::ResultBuffer<ffi::F32> out, bool checked) {
  const bool forward = in_arg == DNNL_ARG_SRC;
  expect(p, "input", p.in, forward ? g.src() : g.dst(), in.size_bytes());
  expect(p, "output", p.out, forward ? g.dst() : g.src(), out->size_bytes());
  expect(p, "kernel", g.weights(true), g.weights(true), kernel.size_bytes());
  Buffers buffers(checked);
  dnnl::stream stream(engine());
  dnnl::memory input = buffers.input("input", p.in, in.typed_data());
  dnnl::memory given = buffers.input("kernel", g.weights(true), kernel.typed_data());
  dnnl::memory output = buffers.output("output", p.out, out->typed_data());
  dnnl::memory weights = buffers.own("reordered kernel", p.kernel);
  dnnl::memory scratchpad = buffers.own("scratchpad", p.scratchpad);
  dnnl::reorder(given, weights).execute(stream, given, weights);
  p.primitive.execute(stream, {{in_arg, input},
                               {DNNL_ARG_WEIGHTS, weights},
                               {out_arg, output},
                               {DNNL_ARG_SCRATCHPAD, scratchpad}});
  stream.wait();
  buffers.verify(p);
}

}  // namespace

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t dilation,
                   int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                   int64_t groups, int64_t threads, bool checked) {
  Geometry g = geometry(x.dimensions(), kernel.dimensions(), y->dimensions(), stride,
                        dilation, pad_top, pad_bottom, pad_left, pad_right, groups);
  return guarded(threads, [&] {
    const Primitive& p = cached(g.key("forward", threads), [&] {
      auto pd = forward_desc(g);
      return primitive<dnnl::convolution_forward>(pd, pd.src_desc(), pd.dst_desc(),
                                                 pd.weights_desc());
    });
    run_with_kernel(g, p, kernel, DNNL_ARG_SRC, x, DNNL_ARG_DST, y, checked);
  });
}

ffi::Error InputGradient(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t dilation,
                         int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                         int64_t pad_right, int64_t groups, int64_t threads, bool checked) {
  Geometry g = geometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride,
                        dilation, pad_top, pad_bottom, pad_left, pad_right, groups);
  return guarded(threads, [&] {
    const Primitive& p = cached(g.key("input_gradient", threads), [&] {
      auto pd = backward_desc<dnnl::convolution_backward_data::primitive_desc>(g);
      return primitive<dnnl::convolution_backward_data>(pd, pd.diff_dst_desc(),
                                                       pd.diff_src_desc(), pd.weights_desc());
    });
    run_with_kernel(g, p, kernel, DNNL_ARG_DIFF_DST, dy, DNNL_ARG_DIFF_SRC, dx, checked);
  });
}

ffi::Error KernelGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride,
                          int64_t dilation, int64_t pad_top, int64_t pad_bottom,
                          int64_t pad_left, int64_t pad_right, int64_t groups,
                          int64_t threads, bool checked) {
  Geometry g = geometry(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride,
                        dilation, pad_top, pad_bottom, pad_left, pad_right, groups);
  return guarded(threads, [&] {
    const Primitive& p = cached(g.key("kernel_gradient", threads), [&] {
      auto pd = backward_desc<dnnl::convolution_backward_weights::primitive_desc>(g);
      return primitive<dnnl::convolution_backward_weights>(pd, pd.src_desc(), pd.diff_dst_desc(),
                                                          pd.diff_weights_desc());
    });
    expect(p, "input", p.in, g.src(), x.size_bytes());
    expect(p, "output gradient", p.out, g.dst(), dy.size_bytes());
    expect(p, "kernel gradient", g.weights(true), g.weights(true), dkernel->size_bytes());
    Buffers buffers(checked);
    dnnl::stream stream(engine());
    dnnl::memory src = buffers.input("input", p.in, x.typed_data());
    dnnl::memory diff_dst = buffers.input("output gradient", p.out, dy.typed_data());
    dnnl::memory diff_weights = buffers.own("kernel gradient in its layout", p.kernel);
    dnnl::memory given = buffers.output("kernel gradient", g.weights(true), dkernel->typed_data());
    dnnl::memory scratchpad = buffers.own("scratchpad", p.scratchpad);
    p.primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                 {DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad}});
    dnnl::reorder(diff_weights, given).execute(stream, diff_weights, given);
    stream.wait();
    buffers.verify(p);
  });
}

// Per channel c, over the rows r of a and b (every axis but the last):
// sums[0][c] = sum_r a[r][c] and sums[1][c] = sum_r a[r][c] * (b[r][c] - center[c]),
// accumulated in double in row order.
ffi::Error ChannelSums(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::F32> center, ffi::ResultBuffer<ffi::F32> sums) {
  const int64_t channels = center.element_count();
  if (b.element_count() != a.element_count() || sums->element_count() != 2 * channels ||
      (channels ? a.element_count() % channels : a.element_count()))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "channel sums: a and b must hold the same rows of as many channels as "
                      "center, and sums two rows of them");
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
      .Attr<int64_t>("threads")                                                \
      .Attr<bool>("checked")

XLA_FFI_DEFINE_HANDLER_SYMBOL(pgnas_convolution_forward, Forward, PGNAS_CONVOLUTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(pgnas_convolution_input_gradient, InputGradient,
                              PGNAS_CONVOLUTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(pgnas_convolution_kernel_gradient, KernelGradient,
                              PGNAS_CONVOLUTION_BINDING);
