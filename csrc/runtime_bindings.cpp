// Python bindings of the runtime core (csrc/runtime). Scheduler, DecoderBatcher and
// RequestQueue are thread-safe (one mutex each). Calls that can block (RequestQueue.pop
// with a timeout, push, DecoderBatcher.next_batch) and the batcher's methods release the
// GIL. Scheduler methods keep it: each is short (tens of microseconds), the engine loop
// calls them every step, and releasing the GIL there hands it to another Python thread
// (output processing) that the loop then waits for (a GIL convoy). Keeping it is safe:
// no thread ever waits for the GIL while it holds the scheduler's mutex.
// BlockAllocator / BlockManager are not thread-safe and keep the GIL, which serialises
// Python callers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>

#include "bindings.h"
#include "runtime/block_allocator.h"
#include "runtime/block_manager.h"
#include "runtime/decoder_batcher.h"
#include "runtime/request_queue.h"
#include "runtime/scheduler.h"

namespace py = pybind11;

namespace unimlm {
namespace {

using release_gil = py::call_guard<py::gil_scoped_release>;

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}

// A 0/1 byte vector as a numpy bool array (one copy; bool is one byte in numpy).
py::array_t<bool> to_numpy_bool(const std::vector<uint8_t>& v) {
  py::array_t<bool> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size());
  return out;
}

py::list pairs(const std::vector<CopyPair>& cow) {
  py::list out;
  for (const CopyPair& p : cow) out.append(py::make_tuple(p.src, p.dst));
  return out;
}

// [N, max_blocks] int32, rows padded with `pad`.
py::array_t<int32_t> padded_block_tables(const StepOutput& o, int32_t pad) {
  const size_t n = o.size();
  py::ssize_t width = 0;
  for (size_t i = 0; i < n; ++i)
    width = std::max<py::ssize_t>(width, o.block_table_start[i + 1] - o.block_table_start[i]);
  py::array_t<int32_t> arr({static_cast<py::ssize_t>(n), width});
  auto a = arr.mutable_unchecked<2>();
  for (size_t i = 0; i < n; ++i) {
    const int32_t b = o.block_table_start[i], e = o.block_table_start[i + 1];
    for (py::ssize_t j = 0; j < width; ++j)
      a(static_cast<py::ssize_t>(i), j) = b + j < e ? o.block_tables[static_cast<size_t>(b + j)] : pad;
  }
  return arr;
}

void bind_allocator(py::module_& m) {
  py::class_<BlockAllocator>(m, "BlockAllocator")
      .def(py::init<int32_t>(), py::arg("num_blocks"))
      .def("allocate", &BlockAllocator::allocate)
      .def("retain", &BlockAllocator::retain, py::arg("block"))
      .def("release", &BlockAllocator::release, py::arg("block"))
      .def("acquire_cached", &BlockAllocator::acquire_cached, py::arg("hash"))
      .def("set_hash", &BlockAllocator::set_hash, py::arg("block"), py::arg("hash"))
      .def("refcount", &BlockAllocator::refcount, py::arg("block"))
      .def("check_invariants", &BlockAllocator::check_invariants)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("num_free", &BlockAllocator::num_free)
      .def_property_readonly("num_cached", &BlockAllocator::num_cached)
      .def_property_readonly("num_used", &BlockAllocator::num_used);
}

void bind_block_manager(py::module_& m) {
  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int32_t, int32_t, bool>(), py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("enable_prefix_caching") = true)
      .def("match_prefix", &BlockManager::match_prefix, py::arg("seq_id"), py::arg("tokens"),
           py::arg("extra_keys") = std::vector<uint64_t>{})
      .def("blocks_needed", &BlockManager::blocks_needed, py::arg("seq_id"), py::arg("write_from"),
           py::arg("num_tokens"))
      .def(
          "allocate_slots",
          [](BlockManager& bm, int64_t seq_id, int64_t write_from, int64_t num_tokens) -> py::object {
            std::vector<CopyPair> cow;
            if (!bm.allocate_slots(seq_id, write_from, num_tokens, &cow)) return py::none();
            return pairs(cow);
          },
          py::arg("seq_id"), py::arg("write_from"), py::arg("num_tokens"),
          "Grows the table; returns the copy-on-write (src, dst) pairs, or None when the pool is short.")
      .def("commit", &BlockManager::commit, py::arg("seq_id"), py::arg("tokens"), py::arg("num_computed"),
           py::arg("extra_keys") = std::vector<uint64_t>{})
      .def("fork", &BlockManager::fork, py::arg("parent_id"), py::arg("child_id"))
      .def("free", &BlockManager::free, py::arg("seq_id"))
      .def("has", &BlockManager::has, py::arg("seq_id"))
      .def("block_table", &BlockManager::block_table, py::arg("seq_id"))
      .def("slot", &BlockManager::slot, py::arg("seq_id"), py::arg("position"))
      .def("refcount", &BlockManager::refcount, py::arg("block"))
      .def("check_invariants", &BlockManager::check_invariants)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("num_free", &BlockManager::num_free)
      .def_property_readonly("num_cached", &BlockManager::num_cached)
      .def_property_readonly("num_used", &BlockManager::num_used)
      .def_property_readonly("num_evictions", &BlockManager::num_evictions)
      .def_property_readonly("prefix_query_tokens", &BlockManager::prefix_query_tokens)
      .def_property_readonly("prefix_hit_tokens", &BlockManager::prefix_hit_tokens);
}

void bind_sizing(py::module_& m) {
  m.def(
      "num_kv_blocks",
      [](int64_t total_memory, int32_t num_layers, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
         int32_t dtype_bytes, double utilization, int64_t weights, int64_t activations, int64_t decoders,
         std::optional<int64_t> override_blocks) {
        KVCacheBudget b{total_memory, utilization, weights, activations, decoders, num_layers,
                        block_size,   num_kv_heads, head_dim, dtype_bytes, override_blocks.value_or(-1)};
        return num_kv_blocks(b);
      },
      py::kw_only(), py::arg("total_memory"), py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"),
      py::arg("block_size") = 16, py::arg("dtype_bytes") = 2, py::arg("utilization") = 0.9, py::arg("weights") = 0,
      py::arg("activations") = 0, py::arg("decoders") = 0, py::arg("num_kv_blocks") = py::none(),
      "KV blocks fitting (total * utilization - weights - activations - decoders), or num_kv_blocks when given.");
  m.def(
      "kv_bytes_per_block",
      [](int32_t num_layers, int32_t num_kv_heads, int32_t head_dim, int32_t block_size, int32_t dtype_bytes) {
        KVCacheBudget b;
        b.num_layers = num_layers;
        b.num_kv_heads = num_kv_heads;
        b.head_dim = head_dim;
        b.block_size = block_size;
        b.dtype_bytes = dtype_bytes;
        return kv_bytes_per_block(b);
      },
      py::kw_only(), py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size") = 16,
      py::arg("dtype_bytes") = 2);
  m.def(
      "block_extra_keys",
      [](int64_t num_tokens, int32_t block_size, const std::vector<std::tuple<int64_t, int64_t, uint64_t>>& spans) {
        std::vector<int64_t> flat;
        for (const auto& s : spans) {
          flat.push_back(std::get<0>(s));
          flat.push_back(std::get<1>(s));
          flat.push_back(static_cast<int64_t>(std::get<2>(s)));
        }
        return block_extra_keys(num_tokens, block_size, flat);
      },
      py::arg("num_tokens"), py::arg("block_size"), py::arg("spans"),
      "Per-block prefix-hash keys: spans = [(start, end, key)], e.g. image token ranges and image hashes.");
}

void bind_scheduler_config(py::module_& m) {
  py::enum_<SchedulingPolicy>(m, "SchedulingPolicy")
      .value("FCFS", SchedulingPolicy::kFcfs)
      .value("PRIORITY", SchedulingPolicy::kPriority);
  py::enum_<SeqState>(m, "SeqState").value("WAITING", SeqState::kWaiting).value("RUNNING", SeqState::kRunning);

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init([](int32_t num_blocks, int32_t block_size, bool prefix, int32_t max_num_seqs,
                       int64_t max_tokens, int64_t max_queue, int64_t max_model_len, SchedulingPolicy policy) {
             SchedulerConfig c{num_blocks, block_size, prefix, max_num_seqs, max_tokens, max_queue, max_model_len, policy};
             c.validate();
             return c;
           }),
           py::kw_only(), py::arg("num_blocks") = 1024, py::arg("block_size") = 16,
           py::arg("enable_prefix_caching") = true, py::arg("max_num_seqs") = 256,
           py::arg("max_num_batched_tokens") = 8192, py::arg("max_queue_size") = 4096, py::arg("max_model_len") = 0,
           py::arg("policy") = SchedulingPolicy::kFcfs)
      .def_readonly("num_blocks", &SchedulerConfig::num_blocks)
      .def_readonly("block_size", &SchedulerConfig::block_size)
      .def_readonly("enable_prefix_caching", &SchedulerConfig::enable_prefix_caching)
      .def_readonly("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readonly("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readonly("max_queue_size", &SchedulerConfig::max_queue_size)
      .def_readonly("max_model_len", &SchedulerConfig::max_model_len)
      .def_readonly("policy", &SchedulerConfig::policy);
}

void bind_step_output(py::module_& m) {
  py::class_<StepOutput>(m, "StepOutput")
      .def("__len__", &StepOutput::size)
      .def_property_readonly("seq_ids", [](const StepOutput& o) { return to_numpy(o.seq_ids); })
      .def_property_readonly("num_new_tokens", [](const StepOutput& o) { return to_numpy(o.num_new_tokens); })
      .def_property_readonly("num_computed", [](const StepOutput& o) { return to_numpy(o.num_computed); })
      .def_property_readonly("is_prefill", [](const StepOutput& o) { return to_numpy_bool(o.is_prefill); })
      .def_property_readonly("do_sample", [](const StepOutput& o) { return to_numpy_bool(o.do_sample); })
      .def_property_readonly("query_start_loc", [](const StepOutput& o) { return to_numpy(o.query_start_loc); })
      .def_property_readonly("slot_mapping", [](const StepOutput& o) { return to_numpy(o.slot_mapping); })
      .def_property_readonly("block_table_start", [](const StepOutput& o) { return to_numpy(o.block_table_start); })
      .def_property_readonly("block_tables_flat", [](const StepOutput& o) { return to_numpy(o.block_tables); })
      .def("block_tables", &padded_block_tables, py::arg("pad") = -1, "[N, max_blocks] int32, padded with pad.")
      .def(
          "block_table",
          [](const StepOutput& o, size_t i) {
            if (i >= o.size()) throw py::index_error("scheduled index out of range");
            return std::vector<int32_t>(o.block_tables.begin() + o.block_table_start[i],
                                        o.block_tables.begin() + o.block_table_start[i + 1]);
          },
          py::arg("i"))
      .def_property_readonly("cow", [](const StepOutput& o) { return pairs(o.cow); })
      .def_readonly("preempted", &StepOutput::preempted)
      .def_readonly("rejected", &StepOutput::rejected)
      .def_readonly("num_batched_tokens", &StepOutput::num_batched_tokens);
}

void bind_scheduler(py::module_& m) {
  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def("add_request", &Scheduler::add_request, py::arg("seq_id"), py::arg("prompt"),
           py::arg("priority") = 0, py::arg("extra_keys") = std::vector<uint64_t>{})
      .def("step", &Scheduler::step)
      .def("update", &Scheduler::update, py::arg("seq_id"), py::arg("appended"))
      .def("update_batch", &Scheduler::update_batch, py::arg("seq_ids"), py::arg("tokens"))
      .def("resolve_batch", &Scheduler::resolve_batch, py::arg("seq_ids"), py::arg("positions"),
           py::arg("values"))
      .def("finish", &Scheduler::finish, py::arg("seq_id"))
      .def("abort", &Scheduler::abort, py::arg("seq_id"))
      .def("contains", &Scheduler::contains, py::arg("seq_id"))
      .def("__contains__", &Scheduler::contains, py::arg("seq_id"))
      .def("state", &Scheduler::state, py::arg("seq_id"))
      .def("num_tokens", &Scheduler::num_tokens, py::arg("seq_id"))
      .def("num_computed_tokens", &Scheduler::num_computed_tokens, py::arg("seq_id"))
      .def("num_cached_tokens", &Scheduler::num_cached_tokens, py::arg("seq_id"))
      .def("block_table", &Scheduler::block_table, py::arg("seq_id"))
      .def("check_invariants", &Scheduler::check_invariants)
      .def_property_readonly("num_waiting", py::cpp_function(&Scheduler::num_waiting))
      .def_property_readonly("num_running", py::cpp_function(&Scheduler::num_running))
      .def_property_readonly("num_free_blocks", py::cpp_function(&Scheduler::num_free_blocks))
      .def_property_readonly("num_cached_blocks", py::cpp_function(&Scheduler::num_cached_blocks))
      .def_property_readonly("num_preemptions", py::cpp_function(&Scheduler::num_preemptions))
      .def_property_readonly("config", &Scheduler::config);
}

void bind_batch_types(py::module_& m) {
  py::class_<DecoderPolicy>(m, "DecoderPolicy")
      .def(py::init([](int32_t max_batch_size, int64_t max_queue_delay_us, int64_t max_queue_size) {
             return DecoderPolicy{max_batch_size, max_queue_delay_us, max_queue_size};
           }),
           py::kw_only(), py::arg("max_batch_size") = 8, py::arg("max_queue_delay_us") = 2000,
           py::arg("max_queue_size") = 4096)
      .def_readonly("max_batch_size", &DecoderPolicy::max_batch_size)
      .def_readonly("max_queue_delay_us", &DecoderPolicy::max_queue_delay_us)
      .def_readonly("max_queue_size", &DecoderPolicy::max_queue_size);

  py::class_<BatchItem>(m, "BatchItem")
      .def(py::init([](int64_t id, int64_t request_id, int64_t payload, int32_t priority, int64_t enqueue_us,
                       int64_t deadline_us) {
             return BatchItem{id, request_id, priority, enqueue_us, deadline_us, payload};
           }),
           py::arg("id"), py::arg("request_id"), py::arg("payload"), py::kw_only(), py::arg("priority") = 0,
           py::arg("enqueue_us") = -1, py::arg("deadline_us") = 0)
      .def_readonly("id", &BatchItem::id)
      .def_readonly("request_id", &BatchItem::request_id)
      .def_readonly("priority", &BatchItem::priority)
      .def_readonly("enqueue_us", &BatchItem::enqueue_us)
      .def_readonly("deadline_us", &BatchItem::deadline_us)
      .def_readonly("payload", &BatchItem::payload)
      .def("__repr__", [](const BatchItem& b) {
        return "BatchItem(id=" + std::to_string(b.id) + ", request_id=" + std::to_string(b.request_id) +
               ", payload=" + std::to_string(b.payload) + ", priority=" + std::to_string(b.priority) + ")";
      });

  py::class_<Batch>(m, "Batch")
      .def_readonly("decoder", &Batch::decoder)
      .def_readonly("items", &Batch::items)
      .def_readonly("expired", &Batch::expired)
      .def_readonly("cancelled", &Batch::cancelled)
      .def_readonly("closed", &Batch::closed)
      .def("empty", &Batch::empty);
}

void bind_batcher(py::module_& m) {
  py::class_<DecoderBatcher>(m, "DecoderBatcher")
      .def(py::init<>())
      .def_static("now_us", &DecoderBatcher::now_us)
      .def("add_decoder", &DecoderBatcher::add_decoder, release_gil(), py::arg("name"), py::arg("policy"))
      .def("submit", &DecoderBatcher::submit, release_gil(), py::arg("decoder"), py::arg("item"))
      .def("cancel", &DecoderBatcher::cancel, release_gil(), py::arg("item_id"))
      .def("cancel_request", &DecoderBatcher::cancel_request, release_gil(), py::arg("request_id"))
      .def("poll", &DecoderBatcher::poll, release_gil(), py::arg("decoder"), py::arg("now_us"))
      .def(
          "next_batch",
          [](DecoderBatcher& b, const std::string& decoder, std::optional<double> timeout_s) {
            const int64_t us = timeout_s ? static_cast<int64_t>(*timeout_s * 1e6) : -1;
            py::gil_scoped_release nogil;
            return b.next_batch(decoder, us);
          },
          py::arg("decoder"), py::arg("timeout") = py::none(),
          "Blocks (GIL released) up to timeout seconds (None: no limit) for a batch or expired/cancelled items.")
      .def("close", &DecoderBatcher::close, release_gil())
      .def_property_readonly("closed", py::cpp_function(&DecoderBatcher::closed, release_gil()))
      .def("queue_size", &DecoderBatcher::queue_size, release_gil(), py::arg("decoder"))
      .def("decoders", &DecoderBatcher::decoders, release_gil());
}

void bind_queue(py::module_& m) {
  py::class_<RequestQueue>(m, "RequestQueue")
      .def(py::init<int64_t>(), py::arg("capacity"))
      .def("push", &RequestQueue::push, release_gil(), py::arg("request_id"),
           "Raises QueueFullError when full, RuntimeError when closed.")
      .def(
          "try_push", [](RequestQueue& q, int64_t id) { return q.try_push(id) == PushStatus::kOk; },
          py::arg("request_id"), "Never blocks (keeps the GIL).")
      .def(
          "pop",
          [](RequestQueue& q, std::optional<double> timeout_s) -> std::optional<int64_t> {
            const int64_t us = timeout_s ? static_cast<int64_t>(*timeout_s * 1e6) : -1;
            int64_t id = 0;
            bool ok;
            if (us == 0) {
              ok = q.pop(&id, 0);  // a poll: keep the GIL (no convoy on the engine loop)
            } else {
              py::gil_scoped_release nogil;
              ok = q.pop(&id, us);
            }
            if (!ok) return std::nullopt;
            return id;
          },
          py::arg("timeout") = py::none(),
          "Blocks (GIL released) up to timeout seconds (None: no limit; 0: a poll that keeps the GIL); None on "
          "timeout or closed and empty.")
      .def("pop_all", &RequestQueue::pop_all, release_gil(), py::arg("max_items") = INT64_MAX)
      .def("close", &RequestQueue::close, release_gil())
      .def_property_readonly("closed", py::cpp_function(&RequestQueue::closed, release_gil()))
      .def_property_readonly("capacity", &RequestQueue::capacity)
      .def("__len__", &RequestQueue::size, release_gil());
}

}  // namespace

void bind_runtime(py::module_& m) {
  py::register_exception<QueueFullError>(m, "QueueFullError", PyExc_RuntimeError);
  bind_allocator(m);
  bind_block_manager(m);
  bind_sizing(m);
  bind_scheduler_config(m);
  bind_step_output(m);
  bind_scheduler(m);
  bind_batch_types(m);
  bind_batcher(m);
  bind_queue(m);
}

}  // namespace unimlm
