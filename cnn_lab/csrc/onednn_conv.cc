// oneDNN's CPU convolutions (NHWC activations, HWIO kernels, float32) as
// XLA FFI handlers: the forward pass, the input gradient and the kernel
// gradient of one 2-D convolution (strides, explicit padding). Built and
// registered by cnn_lab/onednn.py. One set of oneDNN primitives per shape,
// created on first use and kept: oneDNN chooses the kernel (and the
// kernel's weight layout, reordered to and from HWIO) for the machine.
#include <array>
#include <exception>
#include <string>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// N, H, W, C, KH, KW, O, OH, OW, strides, paddings.
using Key = std::array<int64_t, 15>;

struct Plans {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_w_pd;
  dnnl::convolution_backward_weights bwd_w;
  memory::desc x_md, w_md, y_md;  // User layouts.
};

Plans& GetPlans(const Key& k) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Plans>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(k);
  if (it != cache.end()) return *it->second;
  auto [n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr] = k;
  auto p = std::make_unique<Plans>();
  p->x_md = memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  p->w_md = memory::desc({o, c, kh, kw}, dt::f32, tag::hwio);
  p->y_md = memory::desc({n, o, oh, ow}, dt::f32, tag::nhwc);
  memory::desc w_any({o, c, kh, kw}, dt::f32, tag::any);
  memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  auto& eng = Engine();
  // Each call brings its own scratch memory: XLA may run two calls of the
  // same primitive at once (two layers of one shape), and the library's
  // own scratchpad would be shared between them.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, p->x_md, w_any, p->y_md, strides,
      pad_l, pad_r, attr);
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->x_md, w_any, p->y_md,
      strides, pad_l, pad_r, p->fwd_pd, attr);
  p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
  p->bwd_w_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->x_md, w_any, p->y_md,
      strides, pad_l, pad_r, p->fwd_pd, attr);
  p->bwd_w = dnnl::convolution_backward_weights(p->bwd_w_pd);
  auto& ref = *p;
  cache.emplace(k, std::move(p));
  return ref;
}

Key MakeKey(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
            ffi::Span<const int64_t> yd, int64_t sh, int64_t sw, int64_t pt,
            int64_t pb, int64_t pl, int64_t pr) {
  return {xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2],
          sh, sw, pt, pb, pl, pr};
}

// Weights in the primitive's layout: the user's HWIO buffer, or a reordered
// copy.
memory Weights(const memory::desc& want, const memory::desc& user_md,
               void* data, dnnl::stream& s) {
  memory user(user_md, Engine(), data);
  if (want == user_md) return user;
  memory mine(want, Engine());
  dnnl::reorder(user, mine).execute(s, user, mine);
  return mine;
}

ffi::Error ConvFwdUnsafe(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Plans& p = GetPlans(MakeKey(x.dimensions(), w.dimensions(),
                              y->dimensions(), sh, sw, pt, pb, pl, pr));
  dnnl::stream s(Engine());
  memory xm(p.x_md, Engine(), x.typed_data());
  memory ym(p.y_md, Engine(), y->typed_data());
  memory wm = Weights(p.fwd_pd.weights_desc(), p.w_md, w.typed_data(), s);
  memory scratch(p.fwd_pd.scratchpad_desc(), Engine());
  p.fwd.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm},
                    {DNNL_ARG_DST, ym}, {DNNL_ARG_SCRATCHPAD, scratch}});
  s.wait();
  return ffi::Error::Success();
}

ffi::Error ConvBwdDataUnsafe(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Plans& p = GetPlans(MakeKey(dx->dimensions(), w.dimensions(),
                              dy.dimensions(), sh, sw, pt, pb, pl, pr));
  dnnl::stream s(Engine());
  memory dym(p.y_md, Engine(), dy.typed_data());
  memory dxm(p.x_md, Engine(), dx->typed_data());
  memory wm = Weights(p.bwd_data_pd.weights_desc(), p.w_md, w.typed_data(), s);
  memory scratch(p.bwd_data_pd.scratchpad_desc(), Engine());
  p.bwd_data.execute(s, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm},
                         {DNNL_ARG_DIFF_SRC, dxm},
                         {DNNL_ARG_SCRATCHPAD, scratch}});
  s.wait();
  return ffi::Error::Success();
}

ffi::Error ConvBwdWeightsUnsafe(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                          int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                          int64_t pr) {
  Plans& p = GetPlans(MakeKey(x.dimensions(), dw->dimensions(),
                              dy.dimensions(), sh, sw, pt, pb, pl, pr));
  dnnl::stream s(Engine());
  memory xm(p.x_md, Engine(), x.typed_data());
  memory dym(p.y_md, Engine(), dy.typed_data());
  memory user(p.w_md, Engine(), dw->typed_data());
  const memory::desc& want = p.bwd_w_pd.diff_weights_desc();
  memory dwm = want == p.w_md ? user : memory(want, Engine());
  memory scratch(p.bwd_w_pd.scratchpad_desc(), Engine());
  p.bwd_w.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym},
                      {DNNL_ARG_DIFF_WEIGHTS, dwm},
                      {DNNL_ARG_SCRATCHPAD, scratch}});
  if (!(want == p.w_md)) dnnl::reorder(dwm, user).execute(s, dwm, user);
  s.wait();
  return ffi::Error::Success();
}

// oneDNN reports errors (an unsupported shape, no memory) as exceptions,
// which must not cross into XLA.
template <typename F>
ffi::Error Guarded(F f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution: ") + e.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "oneDNN convolution: unknown error");
  }
}

#define GUARDED(NAME)                                                      \
  ffi::Error NAME(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,         \
                  ffi::ResultBuffer<ffi::F32> r, int64_t sh, int64_t sw,    \
                  int64_t pt, int64_t pb, int64_t pl, int64_t pr) {         \
    return Guarded(                                                        \
        [&] { return NAME##Unsafe(a, b, r, sh, sw, pt, pb, pl, pr); });    \
  }
GUARDED(ConvFwd)
GUARDED(ConvBwdData)
GUARDED(ConvBwdWeights)

}  // namespace

#define CONV_ATTRS                                                      \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt")          \
      .Attr<int64_t>("pb").Attr<int64_t>("pl").Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvFwd, ConvFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdData, ConvBwdData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdWeights, ConvBwdWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

