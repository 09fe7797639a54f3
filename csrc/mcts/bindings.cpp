// Python bindings of the batched MCTS Forest (rlkern._C.mcts). The Python wrapper
// (python/rlkern/mcts/forest.py) converts inputs to contiguous arrays of the expected
// dtype without copying when they already are; shapes are checked here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "rlkern/mcts.h"
#include "rlkern/registry.h"
#include "rlkern/simd.h"

namespace py = pybind11;

namespace {

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

void expect_shape(const char* name, const py::array& a, std::initializer_list<int64_t> shape) {
  bool ok = a.ndim() == py::ssize_t(shape.size());
  size_t i = 0;
  for (int64_t d : shape) ok = ok && a.shape(py::ssize_t(i++)) == d;
  if (!ok) {
    std::string want = "(";
    i = 0;
    for (int64_t d : shape) want += (i++ ? ", " : "") + std::to_string(d);
    want += shape.size() == 1 ? ",)" : ")";
    throw py::value_error(std::string(name) + " must have shape " + want + ", got " + shape_str(a));
  }
}

// An optional array argument converted to T. The converted array (a new temporary when
// the input had another dtype or layout) is owned here, so the pointer stays valid for as
// long as this object lives: the caller keeps it until the core is done with the data.
template <typename T>
class OptArray {
 public:
  OptArray(const char* name, const py::object& o, std::initializer_list<int64_t> shape) {
    if (o.is_none()) return;
    auto a = py::cast<Arr<T>>(o);
    expect_shape(name, a, shape);
    data_ = a.data();
    keep_ = std::move(a);
  }
  const T* data() const { return data_; }

 private:
  py::object keep_;
  const T* data_ = nullptr;
};

// One float per leaf: a float32 array of shape (L,), or a Python float that applies to
// every leaf (broadcast here, which is cheaper than numpy's np.full on the Python side).
class RowFloats {
 public:
  RowFloats(const char* name, const py::object& o, int64_t L) {
    if (PyFloat_Check(o.ptr())) {
      const double v = PyFloat_AS_DOUBLE(o.ptr());
      // Out-of-range doubles become +-inf (then rejected as not finite) like numpy's cast.
      const float f = std::fabs(v) > double(FLT_MAX) ? float(v > 0 ? HUGE_VAL : -HUGE_VAL) : float(v);
      fill_.assign(size_t(L), f);
      data_ = fill_.data();
    } else {
      auto a = py::cast<Arr<float>>(o);
      expect_shape(name, a, {L});
      data_ = a.data();
      keep_ = std::move(a);
    }
  }
  const float* data() const { return data_; }

 private:
  py::object keep_;
  std::vector<float> fill_;
  const float* data_ = nullptr;
};

rlk::mcts::Config make_config(int algorithm, float c1, float c2, float dirichlet_alpha, float dirichlet_fraction,
                              int max_considered_actions, float gumbel_scale, float maxvisit_init,
                              float value_scale, bool rescale_values, bool use_mixed_value, float temperature,
                              int max_depth, uint64_t seed, int num_threads) {
  rlk::mcts::Config c;
  c.algorithm = rlk::mcts::Algorithm(algorithm);
  c.c1 = c1;
  c.c2 = c2;
  c.dirichlet_alpha = dirichlet_alpha;
  c.dirichlet_fraction = dirichlet_fraction;
  c.max_considered_actions = max_considered_actions;
  c.gumbel_scale = gumbel_scale;
  c.maxvisit_init = maxvisit_init;
  c.value_scale = value_scale;
  c.rescale_values = rescale_values;
  c.use_mixed_value = use_mixed_value;
  c.temperature = temperature;
  c.max_depth = max_depth;
  c.seed = seed;
  c.num_threads = num_threads;
  return c;
}

// One class per compiled instruction set (see rlkern/mcts.h), with the same interface.
template <typename Forest>
void bind_forest(py::module_& m, const char* name) {
  py::class_<Forest>(m, name)
      .def(py::init([](int64_t B, int64_t A, int64_t N, int64_t E, int algorithm, float c1, float c2, float alpha,
                       float frac, int m_considered, float gumbel_scale, float maxvisit_init, float value_scale,
                       bool rescale, bool mixed, float temperature, int max_depth, uint64_t seed, int threads) {
             return new Forest(B, A, N, E,
                               make_config(algorithm, c1, c2, alpha, frac, m_considered, gumbel_scale, maxvisit_init,
                                           value_scale, rescale, mixed, temperature, max_depth, seed, threads));
           }))
      .def("plan", &Forest::plan, py::arg("num_simulations"))
      .def_property_readonly("planned_simulations", &Forest::planned_simulations)
      .def_property_readonly("num_pending", &Forest::num_pending)
      .def("discard_pending", &Forest::discard_pending)
      .def("set_roots",
           [](Forest& f, Arr<float> logits, Arr<float> value, py::object legal, py::object rows) {
             const int64_t B = f.batch_size(), A = f.num_actions();
             expect_shape("prior_logits", logits, {B, A});
             expect_shape("value", value, {B});
             OptArray<uint8_t> lp("legal_mask", legal, {B, A}), rp("rows", rows, {B});
             py::gil_scoped_release release;
             f.set_roots(logits.data(), value.data(), lp.data(), rp.data());
           })
      .def("select",
           [](Forest& f, Arr<int64_t> tree, Arr<int64_t> parent, Arr<int64_t> action, Arr<int64_t> node) {
             const int64_t B = f.batch_size();
             for (auto* a : {&tree, &parent, &action, &node}) expect_shape("leaf buffer", *a, {B});
             int64_t* t = tree.mutable_data();
             int64_t* p = parent.mutable_data();
             int64_t* ac = action.mutable_data();
             int64_t* n = node.mutable_data();
             py::gil_scoped_release release;
             return f.select(t, p, ac, n);
           })
      .def("select_into",
           [](Forest& f, Arr<int64_t> leaves) {
             const int64_t B = f.batch_size();
             expect_shape("leaf buffer", leaves, {4, B});
             int64_t* p = leaves.mutable_data();
             py::gil_scoped_release release;
             return f.select(p, p + B, p + 2 * B, p + 3 * B);
           },
           "select() writing (tree, parent, action, node) into the rows of one [4, B] int64 array")
      .def("expand_backup",
           [](Forest& f, Arr<float> logits, py::object value, py::object reward, py::object discount,
              py::object legal, py::object terminal) {
             const int64_t L = f.num_pending(), A = f.num_actions();
             if (logits.ndim() != 2 || logits.shape(0) != L)
               throw py::value_error("prior_logits must have shape (" + std::to_string(L) + ", " + std::to_string(A) +
                                     ") (one row per leaf of the last select()), got " + shape_str(logits));
             expect_shape("prior_logits", logits, {L, A});
             RowFloats v("value", value, L), r("reward", reward, L), d("discount", discount, L);
             OptArray<uint8_t> lp("legal_mask", legal, {L, A}), tp("terminal", terminal, {L});
             py::gil_scoped_release release;
             f.expand_backup(L, logits.data(), v.data(), r.data(), d.data(), lp.data(), tp.data());
           })
      .def("expand_select",
           [](Forest& f, Arr<float> logits, py::object value, py::object reward, py::object discount,
              py::object legal, py::object terminal, Arr<int64_t> leaves) {
             const int64_t L = f.num_pending(), A = f.num_actions(), B = f.batch_size();
             if (logits.ndim() != 2 || logits.shape(0) != L)
               throw py::value_error("prior_logits must have shape (" + std::to_string(L) + ", " + std::to_string(A) +
                                     ") (one row per leaf of the last select()), got " + shape_str(logits));
             expect_shape("prior_logits", logits, {L, A});
             expect_shape("leaf buffer", leaves, {4, B});
             RowFloats v("value", value, L), r("reward", reward, L), d("discount", discount, L);
             OptArray<uint8_t> lp("legal_mask", legal, {L, A}), tp("terminal", terminal, {L});
             int64_t* p = leaves.mutable_data();
             py::gil_scoped_release release;
             return f.expand_select(L, logits.data(), v.data(), r.data(), d.data(), lp.data(), tp.data(), p, p + B,
                                    p + 2 * B, p + 3 * B);
           },
           "expand_backup() then select() into the rows of one [4, B] int64 array, in one pass")
      .def("result",
           [](Forest& f, float temperature) {
             const int64_t B = f.batch_size(), A = f.num_actions();
             Arr<int64_t> action(py::ssize_t{B});  // one dimension: the count constructor
             Arr<float> weights({B, A});
             Arr<int32_t> visits({B, A});
             Arr<float> q({B, A});
             Arr<float> root_value(py::ssize_t{B});
             int64_t* ap = action.mutable_data();
             float* wp = weights.mutable_data();
             int32_t* vp = visits.mutable_data();
             float* qp = q.mutable_data();
             float* rp = root_value.mutable_data();
             {
               py::gil_scoped_release release;
               f.result(temperature, ap, wp, vp, qp, rp);
             }
             return py::make_tuple(action, weights, visits, q, root_value);
           })
      .def("advance",
           [](Forest& f, Arr<int64_t> actions) {
             const int64_t B = f.batch_size(), N = f.max_nodes();
             expect_shape("actions", actions, {B});
             Arr<int64_t> o2n({B, N});
             int64_t* op = o2n.mutable_data();
             {
               py::gil_scoped_release release;
               f.advance(actions.data(), op);
             }
             return o2n;
           })
      .def("export",
           [](const Forest& f) {
             const int64_t B = f.batch_size(), A = f.num_actions(), N = f.max_nodes();
             Arr<int32_t> node_visits({B, N}), parents({B, N}), action_from_parent({B, N});
             Arr<float> node_values({B, N}), raw_values({B, N});
             Arr<uint8_t> terminal({B, N});
             Arr<int32_t> children_index({B, N, A}), children_visits({B, N, A});
             Arr<float> children_values({B, N, A}), children_rewards({B, N, A}), children_discounts({B, N, A}),
                 children_prior_logits({B, N, A});
             int32_t *nv = node_visits.mutable_data(), *pa = parents.mutable_data(),
                     *afp = action_from_parent.mutable_data(), *ci = children_index.mutable_data(),
                     *cv = children_visits.mutable_data();
             float *nval = node_values.mutable_data(), *rv = raw_values.mutable_data(),
                   *cval = children_values.mutable_data(), *cr = children_rewards.mutable_data(),
                   *cd = children_discounts.mutable_data(), *cp = children_prior_logits.mutable_data();
             uint8_t* term = terminal.mutable_data();
             {
               py::gil_scoped_release release;
               f.export_tree(nv, nval, rv, pa, afp, term, ci, cv, cval, cr, cd, cp);
             }
             py::dict d;
             d["node_visits"] = node_visits;
             d["node_values"] = node_values;
             d["raw_values"] = raw_values;
             d["parents"] = parents;
             d["action_from_parent"] = action_from_parent;
             d["terminal"] = terminal;
             d["children_index"] = children_index;
             d["children_visits"] = children_visits;
             d["children_values"] = children_values;
             d["children_rewards"] = children_rewards;
             d["children_discounts"] = children_discounts;
             d["children_prior_logits"] = children_prior_logits;
             return d;
           })
      .def("num_nodes",
           [](const Forest& f) {
             Arr<int32_t> out(py::ssize_t{f.batch_size()});
             f.num_nodes(out.mutable_data());
             return out;
           })
      .def("has_root", [](const Forest& f) {
        Arr<uint8_t> out(py::ssize_t{f.batch_size()});
        f.has_root(out.mutable_data());
        return out;
      });
}

void bind(py::module_& m) {
  m.def("considered_visit_sequence", &rlk::mcts::considered_visit_sequence, py::arg("max_considered"),
        py::arg("num_simulations"), "mctx's sequential-halving sequence of considered visits");
  bind_forest<rlk::mcts::isa_default::Forest>(m, "Forest");
#if RLK_MCTS_HAS_AVX2
  bind_forest<rlk::mcts::isa_avx2::Forest>(m, "ForestAVX2");
#endif
  // Whether this CPU (and its OS) runs AVX2 code: the wrapper then takes ForestAVX2.
  m.def("cpu_has_avx2", [] { return bool(RLK_MCTS_HAS_AVX2) && rlk::simd::use_avx2(); });
}

}  // namespace

RLK_REGISTER_BINDINGS(mcts, bind);
