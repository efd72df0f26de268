// oneDNN's CPU convolutions (NHWC activations, HWIO kernels, float32) as
// XLA FFI handlers: the forward pass, the input gradient and the kernel
// gradient of one 2-D convolution (strides, explicit padding). Built and
// registered by cnn_lab/kernels/onednn.py.
//
// Threads: each call splits its batch into as many parts as XLA's
// intra-op thread pool has threads and runs the parts on that pool (the
// calling thread takes parts too), each part a oneDNN primitive on one
// thread. oneDNN's own OpenMP threads would compete for the cores with
// XLA's. Kernel gradients of the parts are summed.
//
// Groups: dimensions before an operand's last four make it a stack of
// independent convolutions, one per index, each with its own input, kernel
// and output (the seeds of a group trained together, vmapped with
// `vmap_method='broadcast_all'`, which gives every operand the same
// leading dimensions). Each is split into parts as a single call is, and
// the parts of all of them go to the pool together.
//
// One set of oneDNN primitives per part shape, created on first use and
// kept: oneDNN chooses the kernel (and the kernel's weight layout,
// reordered to and from HWIO) for the machine.
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// Intel's OpenMP runtime, which this oneDNN build runs on.
extern "C" void omp_set_num_threads(int);
extern "C" int omp_get_max_threads();

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

// oneDNN plans a primitive for the number of threads it may use when the
// primitive is created, and runs it on that many: one, on the thread that
// calls it.
// (The setting is per thread; it is restored, since the thread is XLA's.)
class OneThread {
 public:
  OneThread() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(saved_); }

 private:
  int saved_;
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
  // Each part brings its own scratch memory: the parts of one call, and
  // two calls of one shape, run at the same time.
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

// Kernel gradients split the batch into at most this many parts: each
// part but the first needs a buffer the size of the kernel, summed at the
// end.
constexpr int64_t kMaxWeightParts = 8;

// The shape of one convolution call (of each of its `groups`
// convolutions) and how its batch is split: `parts` per convolution, item
// g * parts + i of the pool's work being part i of convolution g.
struct Call {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  int64_t parts, groups;

  int64_t Start(int64_t i) const { return n * i / parts; }
  Plans& PartPlans(int64_t i) const {
    return GetPlans({Start(i + 1) - Start(i), h, w, c, kh, kw, o, oh, ow,
                     sh, sw, pt, pb, pl, pr});
  }
  int64_t XSize() const { return n * h * w * c; }
  int64_t YSize() const { return n * oh * ow * o; }
  int64_t WSize() const { return kh * kw * c * o; }
  int64_t XOffset(int64_t g, int64_t i) const {
    return g * XSize() + Start(i) * h * w * c;
  }
  int64_t YOffset(int64_t g, int64_t i) const {
    return g * YSize() + Start(i) * oh * ow * o;
  }
};

// The product of the dimensions before the last four (1 for a 4-D
// operand).
int64_t Groups(ffi::Span<const int64_t> d) {
  int64_t g = 1;
  for (size_t i = 0; i + 4 < d.size(); ++i) g *= d[i];
  return g;
}

Call MakeCall(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
              ffi::Span<const int64_t> yd, int64_t sh, int64_t sw,
              int64_t pt, int64_t pb, int64_t pl, int64_t pr,
              int64_t threads) {
  const int64_t groups = Groups(xd);
  if (xd.size() < 4 || xd.size() != wd.size() || xd.size() != yd.size() ||
      Groups(wd) != groups || Groups(yd) != groups) {
    throw std::invalid_argument(
        "operands of one rank (4, or 4 after the same leading dimensions)");
  }
  const size_t x = xd.size() - 4;  // The first of the last four.
  // Each convolution split as a single one is, whatever the number of
  // convolutions: one part per thread, every part a primitive of the
  // shape a single call's parts have. (One part per convolution, where
  // there are as many as threads, was no faster: ResNet-20's train step
  // vmapped over 8 seeds took 5% more CPU time.)
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(xd[x], threads));
  return {xd[x], xd[x + 1], xd[x + 2], xd[x + 3], wd[x], wd[x + 1],
          wd[x + 3], yd[x + 1], yd[x + 2], sh, sw, pt, pb, pl, pr, parts,
          groups};
}

// Runs part(0) ... part(parts - 1) on the pool and the calling thread.
// Each thread claims the next part until none is left; the caller then
// waits only for parts that other threads have started, so a busy pool
// never blocks it. The state is shared with tasks that may start after
// the call returned: they find nothing left and touch only that state.
// An exception in a part is rethrown here.
template <typename F>
void RunParts(ffi::ThreadPool& pool, int64_t parts, const F& part) {
  const int64_t helpers = std::min<int64_t>(parts, pool.num_threads()) - 1;
  struct State {
    std::atomic<int64_t> next{0};
    int64_t finished = 0;
    std::exception_ptr error;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, parts, &part] {
    for (int64_t i; (i = state->next.fetch_add(1)) < parts;) {
      std::exception_ptr error;
      try {
        part(i);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(state->mu);
      if (error && !state->error) state->error = error;
      if (++state->finished == parts) state->cv.notify_all();
    }
  };
  for (int64_t t = 0; t < helpers; ++t) {
    try {
      pool.Schedule([work] { work(); });
    } catch (...) {  // No memory for a task: this thread runs its part.
      break;
    }
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->finished == parts; });
  if (state->error) std::rethrow_exception(state->error);
}

// Weights in the layout `want`: the user's HWIO buffer, or a reordered
// copy.
memory Weights(const memory::desc& want, const memory::desc& user_md,
               void* data) {
  memory user(user_md, Engine(), data);
  if (want == user_md) return user;
  memory mine(want, Engine());
  dnnl::stream s(Engine());
  dnnl::reorder(user, mine).execute(s, user, mine);
  s.wait();
  return mine;
}

// The forward pass (x -> y) and the input gradient (dy -> dx): one
// activation in, one out, with the weights reordered once per call (one
// convolution), or by each part for its own (several: the kernels are
// small, and the parts then need no common step before them).
void WithWeights(ffi::ThreadPool& pool, const Call& call, bool forward,
                 float* w, float* in, float* out) {
  auto pd = [forward](Plans& p) -> const dnnl::primitive_desc& {
    if (forward) return p.fwd_pd;
    return p.bwd_data_pd;
  };
  Plans& first = call.PartPlans(0);
  memory wm = call.groups == 1
                  ? Weights(pd(first).weights_desc(), first.w_md, w)
                  : memory();
  RunParts(pool, call.groups * call.parts, [&](int64_t item) {
    OneThread one;
    const int64_t g = item / call.parts, i = item % call.parts;
    Plans& p = call.PartPlans(i);
    memory wi = call.groups == 1 && pd(p).weights_desc() == wm.get_desc()
                    ? wm
                    : Weights(pd(p).weights_desc(), p.w_md,
                              w + g * call.WSize());
    dnnl::stream s(Engine());
    memory xm(p.x_md, Engine(), (forward ? in : out) + call.XOffset(g, i));
    memory ym(p.y_md, Engine(), (forward ? out : in) + call.YOffset(g, i));
    memory scratch(pd(p).scratchpad_desc(), Engine());
    if (forward) {
      p.fwd.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wi},
                        {DNNL_ARG_DST, ym}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      p.bwd_data.execute(s, {{DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_WEIGHTS, wi},
                             {DNNL_ARG_DIFF_SRC, xm},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    s.wait();
  });
}

ffi::Error ConvFwdUnsafe(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                         int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                         int64_t pr) {
  OneThread one;
  Call call = MakeCall(x.dimensions(), w.dimensions(), y->dimensions(), sh,
                       sw, pt, pb, pl, pr, pool.num_threads());
  WithWeights(pool, call, true, w.typed_data(), x.typed_data(),
              y->typed_data());
  return ffi::Error::Success();
}

ffi::Error ConvBwdDataUnsafe(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                             ffi::Buffer<ffi::F32> w,
                             ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                             int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                             int64_t pr) {
  OneThread one;
  Call call = MakeCall(dx->dimensions(), w.dimensions(), dy.dimensions(),
                       sh, sw, pt, pb, pl, pr, pool.num_threads());
  WithWeights(pool, call, false, w.typed_data(), dy.typed_data(),
              dx->typed_data());
  return ffi::Error::Success();
}

ffi::Error ConvBwdWeightsUnsafe(ffi::ThreadPool pool,
                                ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> dy,
                                ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                                int64_t sw, int64_t pt, int64_t pb,
                                int64_t pl, int64_t pr) {
  OneThread one;
  Call call = MakeCall(x.dimensions(), dw->dimensions(), dy.dimensions(),
                       sh, sw, pt, pb, pl, pr, pool.num_threads());
  const int64_t size = call.WSize();
  // Part 0 of each convolution writes HWIO into its result, the others
  // into their own buffers, summed into it at the end (at most
  // kMaxWeightParts parts per convolution).
  call.parts = std::min(call.parts, kMaxWeightParts);
  const int64_t others = call.parts - 1;
  std::unique_ptr<float[]> partial(new float[call.groups * others * size]);
  RunParts(pool, call.groups * call.parts, [&](int64_t item) {
    OneThread one;
    const int64_t g = item / call.parts, i = item % call.parts;
    Plans& p = call.PartPlans(i);
    float* out = i == 0 ? dw->typed_data() + g * size
                        : partial.get() + (g * others + i - 1) * size;
    dnnl::stream s(Engine());
    memory xm(p.x_md, Engine(), x.typed_data() + call.XOffset(g, i));
    memory dym(p.y_md, Engine(), dy.typed_data() + call.YOffset(g, i));
    memory user(p.w_md, Engine(), out);
    const memory::desc& want = p.bwd_w_pd.diff_weights_desc();
    memory dwm = want == p.w_md ? user : memory(want, Engine());
    memory scratch(p.bwd_w_pd.scratchpad_desc(), Engine());
    p.bwd_w.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym},
                        {DNNL_ARG_DIFF_WEIGHTS, dwm},
                        {DNNL_ARG_SCRATCHPAD, scratch}});
    if (!(want == p.w_md)) dnnl::reorder(dwm, user).execute(s, dwm, user);
    s.wait();
  });
  for (int64_t g = 0; g < call.groups; ++g) {
    float* total = dw->typed_data() + g * size;
    for (int64_t i = 1; i < call.parts; ++i) {
      const float* part = partial.get() + (g * others + i - 1) * size;
      for (int64_t j = 0; j < size; ++j) total[j] += part[j];
    }
  }
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

#define GUARDED(NAME)                                                       \
  ffi::Error NAME(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,            \
                  ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> r,   \
                  int64_t sh, int64_t sw, int64_t pt, int64_t pb,           \
                  int64_t pl, int64_t pr) {                                 \
    return Guarded(                                                         \
        [&] { return NAME##Unsafe(pool, a, b, r, sh, sw, pt, pb, pl, pr); }); \
  }
GUARDED(ConvFwd)
GUARDED(ConvBwdData)
GUARDED(ConvBwdWeights)

}  // namespace

#define CONV_BINDING                                                    \
  ffi::Ffi::Bind()                                                      \
      .Ctx<ffi::ThreadPool>()                                           \
      .Arg<ffi::Buffer<ffi::F32>>()                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                     \
      .Ret<ffi::Buffer<ffi::F32>>()                                     \
      .Attr<int64_t>("sh")                                              \
      .Attr<int64_t>("sw")                                              \
      .Attr<int64_t>("pt")                                              \
      .Attr<int64_t>("pb")                                              \
      .Attr<int64_t>("pl")                                              \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvFwd, ConvFwd, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdData, ConvBwdData, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdWeights, ConvBwdWeights,
                              CONV_BINDING);
