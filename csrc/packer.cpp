// Streaming best-fit-decreasing sequence packer, bound with pybind11 (no torch inside).
//
// The algorithm (engine/data/packing_reference.py reproduces it step for step; keep them in sync):
//
// State: `pending`, at most `window` items waiting, ordered by (length descending, arrival
// ascending); `open rows`, at most `max_open`, each with `remaining` free slots (max_len - used),
// ordered by (remaining ascending, row id ascending); row ids count up from 0 as rows open.
//
// add(item): the item joins `pending` (after overflow handling: "error" rejects an example longer
//   than max_len, "truncate" keeps its first max_len tokens, "split" cuts it into consecutive
//   pieces of max_len tokens, the last one shorter, each piece an item added in turn); then, while
//   more than `window` items are pending, STEP.
// STEP: take the first pending item (the longest; the earliest among equals) and PLACE it.
// PLACE(item): the open row with the smallest remaining >= item length (smallest id among equals)
//   takes it (best fit). If no open row fits: when `max_open` rows are open, CLOSE the fullest one
//   (smallest remaining, smallest id among equals); then open a new row holding the item. A row
//   whose remaining reaches 0 is emitted at once.
// CLOSE(row): FILL the row, then emit it.
// FILL(row): while some pending item is no longer than the row's remaining space, the longest such
//   item (earliest among equals) moves into the row.
// flush(): STEP until nothing is pending; then emit every open row in row-id order.
//
// A row holds its items in the order they were placed. Emitted rows are exactly as long as their
// tokens (no padding). Per token: position ids restart at 0 for every item; the label is the token
// id where the label mask is set, else -100, and always -100 on an item's first token (under the
// usual shift-by-one loss that token is the target of the previous item's last token, which must
// not be learnt). Memory: at most window + 1 pending items and max_open rows, so bounded by
// (window + 1 + max_open) * max_len tokens, independent of the dataset size.
//
// Input (three doors, the same checks, the same rows): add (one example), add_many (flat ids +
// n + 1 offsets: the layout of an Arrow list column; int32 or int64 offsets; a mask or labels with
// their own offsets) and add_list (a Python list of sequences, (ids, labels) pairs or dicts). Every
// example of a call is checked before any is added, so a failed call leaves the packer unchanged:
// non-empty, integer, 1-D, ids in [0, 2^31 - 1], labels one per token and each -100 or the token
// id, offsets non-decreasing and inside the ids, at most max_len tokens under "error". A
// std::invalid_argument (Python ValueError) names the first bad example by its index among all
// the examples this packer was given.
//
// Speed (the algorithm above is the whole contract; none of this changes a row):
// - Token ids are kept as int32 while pending, read straight from the caller's buffer (numpy
//   array or Arrow buffer) in whatever integer dtype it has (no cast copy; Python lists of ints
//   are read into a reused staging vector), and an all-ones label mask is not stored at all.
// - The hot loops (range check, copy, row writing) are built for AVX2 and for any x86-64 (GCC
//   target_clones), and the two ordered sets recycle their nodes instead of calling malloc.
// - A row is written in one pass per item: input_ids, labels and position_ids (int64) together,
//   straight into the flat output arrays that pop_ready hands to numpy without copying.
// - Output memory is recycled: when numpy frees an array from pop_ready, its block goes back to a
//   small pool the next rows are written into, so steady streaming takes no fresh pages (page
//   faults and kernel page zeroing were a third of the time before).
// - add, add_many, add_list and flush release the GIL while they pack; one packer serves one
//   thread at a time (a second concurrent call raises RuntimeError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace py = pybind11;

// The hot loops are built twice, for AVX2 and for any x86-64, and the loader picks one per machine
// (GCC function multiversioning), so one portable build still uses 256-bit vectors where it can.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define REFTEACHER_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define REFTEACHER_VECTOR_CLONES
#endif

namespace {

enum class Overflow { Error, Truncate, Split };

struct PendingKey {
    int64_t length;
    int64_t arrival;
    int64_t slot;
};
// Longest first; earliest arrival first among equal lengths.
struct PendingOrder {
    bool operator()(const PendingKey& a, const PendingKey& b) const {
        if (a.length != b.length) return a.length > b.length;
        return a.arrival < b.arrival;
    }
};

struct RowKey {
    int64_t remaining;
    int64_t row_id;
    int64_t row_slot;
};
// Fullest first (least remaining); smallest id first among equals.
struct RowOrder {
    bool operator()(const RowKey& a, const RowKey& b) const {
        if (a.remaining != b.remaining) return a.remaining < b.remaining;
        return a.row_id < b.row_id;
    }
};

// Keeps the freed nodes of one std::set (all of one size) for reuse, so steady packing, which
// inserts and erases a few nodes per example, does not call malloc.
struct NodeCache {
    size_t node_size = 0;
    std::vector<void*> free;
    NodeCache() = default;
    NodeCache(const NodeCache&) = delete;
    NodeCache& operator=(const NodeCache&) = delete;
    ~NodeCache() {
        for (void* node : free) ::operator delete(node);
    }
};

template <typename T>
struct CachingAllocator {
    using value_type = T;
    NodeCache* cache;
    explicit CachingAllocator(NodeCache* c) noexcept : cache(c) {}
    template <typename U>
    CachingAllocator(const CachingAllocator<U>& other) noexcept : cache(other.cache) {}
    T* allocate(size_t n) {
        if (n == 1 && (cache->node_size == 0 || cache->node_size == sizeof(T))) {
            cache->node_size = sizeof(T);
            if (!cache->free.empty()) {
                void* node = cache->free.back();
                cache->free.pop_back();
                return static_cast<T*>(node);
            }
        }
        return static_cast<T*>(::operator new(n * sizeof(T)));
    }
    void deallocate(T* p, size_t n) noexcept {
        if (n == 1 && cache->node_size == sizeof(T)) {
            try {
                cache->free.push_back(p);
                return;
            } catch (const std::bad_alloc&) {  // no room to remember it: free it
            }
        }
        ::operator delete(p);
    }
    template <typename U>
    bool operator==(const CachingAllocator<U>& other) const noexcept { return cache == other.cache; }
    template <typename U>
    bool operator!=(const CachingAllocator<U>& other) const noexcept { return cache != other.cache; }
};

// One pending item (an example or a piece of one), its ids as int32. A slot holds room for
// 2^size_class tokens (at most max_len) and is reused only for items of that class, so held memory
// stays within twice the tokens pending and in open rows, and steady streaming does not allocate.
struct Item {
    int64_t example = 0;
    int64_t length = 0;
    int size_class = 0;
    bool masked = false;  // false when every token takes loss (no mask kept)
    std::unique_ptr<int32_t[]> ids;
    std::unique_ptr<uint8_t[]> mask;  // allocated on first masked use
};

// Smallest c with 2^c >= length (length >= 1).
inline int size_class_of(int64_t length) {
    int c = 0;
    while ((int64_t{1} << c) < length) ++c;
    return c;
}

struct Row {
    int64_t row_id = 0;
    int64_t remaining = 0;
    std::vector<int64_t> item_slots;
};

// Malloc'd blocks that numpy has given back, kept for reuse (bounded). Shared by a Buffer and the
// arrays it released, so a block can come home after the packer itself is gone.
class BlockPool {
public:
    static constexpr size_t kMaxBlocks = 4;
    ~BlockPool() {
        for (auto& block : blocks_) std::free(block.first);
    }
    void give(void* data, size_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (blocks_.size() < kMaxBlocks) {
            blocks_.emplace_back(data, bytes);
            return;
        }
        // Keep the largest blocks.
        auto smallest = std::min_element(blocks_.begin(), blocks_.end(),
                                         [](const auto& a, const auto& b) { return a.second < b.second; });
        if (smallest->second < bytes) {
            std::free(smallest->first);
            *smallest = {data, bytes};
        } else {
            std::free(data);
        }
    }
    // The largest block kept, or {nullptr, 0}.
    std::pair<void*, size_t> take() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (blocks_.empty()) return {nullptr, 0};
        auto largest = std::max_element(blocks_.begin(), blocks_.end(),
                                        [](const auto& a, const auto& b) { return a.second < b.second; });
        auto block = *largest;
        *largest = blocks_.back();
        blocks_.pop_back();
        return block;
    }

private:
    std::mutex mutex_;
    std::vector<std::pair<void*, size_t>> blocks_;
};

// A block lent to numpy: returned to its pool when the array (and every view of it) is freed.
struct Lease {
    void* data;
    size_t bytes;
    std::shared_ptr<BlockPool> pool;
};

// A growable array that never zero-fills and hands its memory to numpy without copying.
template <typename T>
class Buffer {
public:
    Buffer() : pool_(std::make_shared<BlockPool>()) {}
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() { std::free(data_); }

    size_t size() const { return size_; }
    // Makes room for n more elements and returns where they go; the caller writes all n.
    T* extend(size_t n) {
        if (size_ + n > capacity_) grow(size_ + n);
        T* at = data_ + size_;
        size_ += n;
        return at;
    }
    void push_back(T value) { *extend(1) = value; }
    // Moves the contents into a 1-D numpy array and leaves the buffer empty.
    py::array_t<T> release() {
        if (data_ == nullptr) grow(1);
        auto* lease = new Lease{data_, capacity_ * sizeof(T), pool_};
        T* data = data_;
        const size_t n = size_;
        data_ = nullptr;
        size_ = capacity_ = 0;
        py::capsule owner(lease, [](void* p) {
            auto* l = static_cast<Lease*>(p);
            l->pool->give(l->data, l->bytes);
            delete l;
        });
        return py::array_t<T>({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))}, data, owner);
    }

private:
    void grow(size_t need) {
        if (data_ == nullptr) {  // fresh start: take the largest recycled block
            auto block = pool_->take();
            data_ = static_cast<T*>(block.first);
            capacity_ = block.second / sizeof(T);
            if (need <= capacity_) return;
        }
        size_t capacity = std::max<size_t>({need, capacity_ * 2, 1024 / sizeof(T)});
        T* data = static_cast<T*>(std::realloc(data_, capacity * sizeof(T)));
        if (data == nullptr) throw std::bad_alloc();
        data_ = data;
        capacity_ = capacity;
    }

    T* data_ = nullptr;
    size_t size_ = 0, capacity_ = 0;
    std::shared_ptr<BlockPool> pool_;
};

// ---------------------------------------------------------------------------------------------
// Reading the caller's integers in place
// ---------------------------------------------------------------------------------------------

constexpr int64_t kIgnoreIndex = -100;
constexpr int64_t kMaxTokenId = std::numeric_limits<int32_t>::max();

inline bool little_endian() {
    const uint16_t probe = 1;
    return *reinterpret_cast<const uint8_t*>(&probe) == 1;
}

// A 1-D integer buffer read in place: a pointer and its element type (numpy's one-letter codes:
// l/i/h/b signed 64/32/16/8 bits, L/I/H/B unsigned). `keep` holds the object that owns the memory.
// `staged` >= 0 instead means the values sit at that offset of a staging vector (int64) that may
// still grow, so the pointer is taken only once every example of the call has been read.
struct IntView {
    const void* data = nullptr;
    char type = 'l';
    int64_t size = 0;
    int64_t staged = -1;
    py::object keep;

    // Calls f(const T* data) with the buffer's own element type.
    template <typename F>
    void visit(F&& f) const {
        switch (type) {
            case 'i': return f(static_cast<const int32_t*>(data));
            case 'h': return f(static_cast<const int16_t*>(data));
            case 'b': return f(static_cast<const int8_t*>(data));
            case 'L': return f(static_cast<const uint64_t*>(data));
            case 'I': return f(static_cast<const uint32_t*>(data));
            case 'H': return f(static_cast<const uint16_t*>(data));
            case 'B': return f(static_cast<const uint8_t*>(data));
            default: return f(static_cast<const int64_t*>(data));
        }
    }
};

// The element code of an integer dtype of this kind ('i' or 'u') and size in bytes; 0 if none.
char int_code(char kind, py::ssize_t itemsize) {
    const bool is_signed = kind == 'i';
    switch (itemsize) {
        case 8: return is_signed ? 'l' : 'L';
        case 4: return is_signed ? 'i' : 'I';
        case 2: return is_signed ? 'h' : 'H';
        case 1: return is_signed ? 'b' : 'B';
        default: return 0;
    }
}

std::string shape_text(const py::detail::PyArray_Proxy* proxy) {
    std::string text = "(";
    for (int d = 0; d < proxy->nd; ++d) text += (d ? ", " : "") + std::to_string(proxy->dimensions[d]);
    return text + (proxy->nd == 1 ? ",)" : ")");
}

// Reads a numpy array as 1-D integers into `view`: in place when it is contiguous, native-endian
// and of a plain integer type, else through one converting copy to int64. Returns "" or what is
// wrong ("must be a flat 1-D sequence of integers, got shape (2, 3)", "must be integers, got
// dtype float64"). An empty array of any dtype reads as empty (the caller reports emptiness).
std::string read_array(py::handle array, IntView& view) {
    const auto* proxy = py::detail::array_proxy(array.ptr());
    if (proxy->nd != 1) return "must be a flat 1-D sequence of integers, got shape " + shape_text(proxy);
    auto dtype = py::reinterpret_borrow<py::dtype>(proxy->descr);
    view.size = proxy->dimensions[0];
    view.staged = -1;
    view.type = 'l';
    view.data = nullptr;
    const char kind = dtype.kind();
    if (kind != 'i' && kind != 'u') {
        if (view.size == 0) return "";
        return "must be integers, got dtype " + std::string(py::str(dtype));
    }
    const char code = int_code(kind, dtype.itemsize());
    const char order = dtype.byteorder();
    const bool native = order == '=' || order == '|' || order == (little_endian() ? '<' : '>');
    const bool contiguous = view.size <= 1 || proxy->strides[0] == dtype.itemsize();
    if (code != 0 && native && contiguous) {
        view.data = proxy->data;
        view.type = code;
        view.keep = py::reinterpret_borrow<py::object>(array);
        return "";
    }
    auto copy = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(array);
    if (!copy) throw py::error_already_set();
    view.data = copy.data();
    view.keep = std::move(copy);
    return "";
}

inline bool is_sequence_like(PyObject* value) {
    if (PyLong_Check(value) || PyFloat_Check(value) || PyUnicode_Check(value) || PyBytes_Check(value)) return false;
    if (PyList_Check(value) || PyTuple_Check(value) || py::isinstance<py::array>(value)) return true;
    return PyObject_HasAttrString(value, "__len__") == 1;
}

// Reads a Python list or tuple of ints into `stage` (int64) and points `view` at it (by offset).
// Returns "" or what is wrong. Ints beyond int64 are clamped (the token range check rejects them).
std::string read_int_list(PyObject* seq, IntView& view, std::vector<int64_t>& stage) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    const size_t start = stage.size();
    stage.resize(start + static_cast<size_t>(n));
    int64_t* out = stage.data() + start;
    for (Py_ssize_t k = 0; k < n; ++k) {
        PyObject* item = items[k];
        int overflow = 0;
        long long value;
        if (PyLong_CheckExact(item)) {
            value = PyLong_AsLongLongAndOverflow(item, &overflow);
        } else if (PyBool_Check(item) || PyFloat_Check(item) || !PyIndex_Check(item)) {
            stage.resize(start);
            if (is_sequence_like(item))
                return "must be a flat 1-D sequence of integers (element " + std::to_string(k) + " is a " +
                       Py_TYPE(item)->tp_name + ")";
            return std::string("must be integers, got ") + Py_TYPE(item)->tp_name;
        } else {  // an int subclass or an integer scalar of numpy
            py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(item));
            if (!index) throw py::error_already_set();
            value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
        }
        if (overflow != 0)
            value = overflow > 0 ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::min();
        out[k] = static_cast<int64_t>(value);
    }
    view.data = nullptr;
    view.type = 'l';
    view.size = n;
    view.staged = static_cast<int64_t>(start);
    view.keep = py::object();
    return "";
}

// Reads one example's ids or labels (a numpy array, a list or tuple of ints, or anything numpy
// turns into an integer array) into `view`; returns "" or what is wrong.
std::string read_tokens(py::handle value, IntView& view, std::vector<int64_t>& stage) {
    PyObject* p = value.ptr();
    if (py::isinstance<py::array>(value)) return read_array(value, view);
    if (PyList_Check(p) || PyTuple_Check(p)) return read_int_list(p, view, stage);
    if (p == Py_None || PyUnicode_Check(p) || PyBytes_Check(p) || PyLong_Check(p) || PyFloat_Check(p))
        return std::string("must be a flat sequence of integers, got ") + Py_TYPE(p)->tp_name;
    py::array array = py::reinterpret_steal<py::array>(py::detail::npy_api::get().PyArray_FromAny_(
        p, nullptr, 0, 0, py::detail::npy_api::NPY_ARRAY_ENSUREARRAY_, nullptr));
    if (!array) {
        PyErr_Clear();
        return std::string("must be a flat sequence of integers, got ") + Py_TYPE(p)->tp_name;
    }
    return read_array(array, view);
}

// Position of the first value of p[0:n] outside the token range [0, 2^31 - 1], or -1.
template <typename T>
REFTEACHER_VECTOR_CLONES int64_t first_bad_token(const T* p, int64_t n) {
    if constexpr (std::is_unsigned_v<T> && sizeof(T) < 4) {
        return -1;
    } else {
        uint64_t outside = 0;  // one vectorised pass; the position is looked for only on failure
        for (int64_t i = 0; i < n; ++i) outside |= static_cast<uint64_t>(static_cast<int64_t>(p[i])) >> 31;
        if (outside == 0) return -1;
        for (int64_t i = 0; i < n; ++i) {
            if ((static_cast<uint64_t>(static_cast<int64_t>(p[i])) >> 31) != 0) return i;
        }
        return -1;
    }
}

// "example E: token ids must be >= 0, got V" or "... must fit in int32 ..., got V".
template <typename T>
std::string bad_token_message(int64_t example, T value) {
    std::string shown = std::is_signed_v<T> ? std::to_string(static_cast<int64_t>(value))
                                            : std::to_string(static_cast<uint64_t>(value));
    if (std::is_signed_v<T> && static_cast<int64_t>(value) < 0)
        return "example " + std::to_string(example) + ": token ids must be >= 0, got " + shown;
    return "example " + std::to_string(example) + ": token ids must fit in int32 (at most " +
           std::to_string(kMaxTokenId) + "), got " + shown;
}

// Writes mask[t] = (labels[t] != -100) for one example and returns the first position where a
// label is neither -100 nor the token id (-1 when there is none).
template <typename TI, typename TL>
int64_t labels_to_mask(const TI* ids, const TL* labels, int64_t n, uint8_t* mask) {
    int64_t bad = -1;
    for (int64_t t = 0; t < n; ++t) {
        const int64_t label = static_cast<int64_t>(labels[t]);
        const bool loss = label != kIgnoreIndex;
        mask[t] = loss;
        if (loss && label != static_cast<int64_t>(ids[t]) && bad < 0) bad = t;
    }
    return bad;
}

// n + 1 example offsets, int32 (Arrow lists) or int64 (Arrow large lists, numpy), read in place.
struct Offsets {
    const int32_t* i32 = nullptr;
    const int64_t* i64 = nullptr;
    int64_t count = 0;  // n + 1
    py::object keep;
    int64_t operator[](int64_t i) const { return i64 ? i64[i] : static_cast<int64_t>(i32[i]); }
};

Offsets read_offsets(py::handle obj, const char* what) {
    py::array array = py::array::ensure(obj);
    if (!array) throw std::invalid_argument(std::string(what) + " must be an array of integers");
    IntView view;
    std::string problem = read_array(array, view);
    if (!problem.empty()) throw std::invalid_argument(std::string(what) + " " + problem);
    Offsets out;
    out.count = view.size;
    if (view.type != 'l' && view.type != 'i') {  // other integer types: one copy to int64
        auto copy = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(array);
        out.i64 = copy.data();
        out.keep = std::move(copy);
        return out;
    }
    if (view.type == 'l') out.i64 = static_cast<const int64_t*>(view.data);
    else out.i32 = static_cast<const int32_t*>(view.data);
    out.keep = std::move(view.keep);
    return out;
}

// Writes one item's tokens into the three int64 outputs in a single pass (vectorised by the compiler).
// Plain stores, not streaming ones: the pooled output blocks mostly stay in cache, and measured
// streaming stores were slower.
REFTEACHER_VECTOR_CLONES
void write_item(const int32_t* __restrict src, const uint8_t* __restrict mask, size_t len, int64_t* __restrict ids,
                int64_t* __restrict labels, int64_t* __restrict positions) {
    if (mask == nullptr) {
        for (size_t t = 0; t < len; ++t) {
            const int64_t v = src[t];
            ids[t] = v;
            labels[t] = v;
            positions[t] = static_cast<int64_t>(t);
        }
    } else {
        for (size_t t = 0; t < len; ++t) {
            const int64_t v = src[t];
            ids[t] = v;
            labels[t] = mask[t] ? v : -100;
            positions[t] = static_cast<int64_t>(t);
        }
    }
    labels[0] = -100;
}

// dst[0:n] = src[0:n] as int32 (values already checked to fit).
template <typename T>
REFTEACHER_VECTOR_CLONES void copy_to_int32(const T* __restrict src, int32_t* __restrict dst, int64_t n) {
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<int32_t>(src[t]);
}

// True when every byte of mask[0:n] is nonzero.
REFTEACHER_VECTOR_CLONES bool all_set(const uint8_t* mask, int64_t n) {
    uint8_t all = 1;
    for (int64_t t = 0; t < n; ++t) all &= (mask[t] != 0);
    return all != 0;
}

// Marks a packer busy for one call; a second thread calling in meanwhile gets RuntimeError.
class BusyGuard {
public:
    explicit BusyGuard(std::atomic<bool>& busy) : busy_(busy) {
        if (busy_.exchange(true))
            throw std::runtime_error("this Packer is already in use by another thread; use one packer per thread");
    }
    ~BusyGuard() { busy_.store(false); }

private:
    std::atomic<bool>& busy_;
};

class Packer {
public:
    Packer(int64_t max_len, int64_t window, const std::string& overflow, int64_t max_open)
        : max_len_(max_len), window_(window), max_open_(max_open) {
        if (max_len < 1) throw std::invalid_argument("max_len must be >= 1, got " + std::to_string(max_len));
        if (max_len > std::numeric_limits<int32_t>::max())
            throw std::invalid_argument("max_len must fit in int32 (cu_seqlens are int32)");
        if (window < 1) throw std::invalid_argument("window must be >= 1, got " + std::to_string(window));
        if (max_open < 1) throw std::invalid_argument("max_open must be >= 1, got " + std::to_string(max_open));
        if (overflow == "error") overflow_ = Overflow::Error;
        else if (overflow == "truncate") overflow_ = Overflow::Truncate;
        else if (overflow == "split") overflow_ = Overflow::Split;
        else throw std::invalid_argument("overflow must be 'error', 'truncate' or 'split', got '" + overflow + "'");
        row_offsets_.push_back(0);
        row_segment_offsets_.push_back(0);
    }

    // One example: ids (1-D integers), mask (1-D bool/uint8, same length, nonzero = loss) or None.
    void add(py::object ids, py::object mask) {
        BusyGuard busy(busy_);
        IntView view;
        std::vector<int64_t> stage;
        const std::string problem = read_tokens(ids, view, stage);
        if (!problem.empty()) throw std::invalid_argument("token ids " + problem);
        if (view.staged >= 0) view.data = stage.data();
        const int64_t bounds[2] = {0, view.size};
        Offsets offsets;
        offsets.i64 = bounds;
        offsets.count = 2;
        add_flat(view, offsets, mask, py::none(), py::none());
    }

    // Many examples: flat ids, offsets (n + 1 non-decreasing positions into ids, int32 or int64
    // read in place), and per token either a mask or labels (with their own offsets, or the ids').
    void add_many(py::object flat_ids, py::object offsets, py::object flat_mask, py::object flat_labels,
                  py::object label_offsets) {
        BusyGuard busy(busy_);
        IntView view = read_flat(flat_ids, "token ids");
        add_flat(view, read_offsets(offsets, "offsets"), flat_mask, flat_labels, label_offsets);
    }

    // A list (or tuple) of examples, each an integer sequence, an (input_ids, labels) pair or a dict
    // with "input_ids" and optional "labels" (-100 where no loss is taken).
    void add_list(py::object examples) {
        BusyGuard busy(busy_);
        py::object seq =
            py::reinterpret_steal<py::object>(PySequence_Fast(examples.ptr(), "examples must be a list or tuple"));
        if (!seq) throw py::error_already_set();
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
        PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
        std::vector<IntView> views(static_cast<size_t>(n));
        std::vector<int64_t> mask_at(static_cast<size_t>(n), -1);
        id_stage_.clear();
        mask_stage_.clear();
        for (Py_ssize_t i = 0; i < n; ++i) {
            const int64_t example = next_example_ + i;
            PyObject* item = items[i];
            PyObject* ids = item;
            PyObject* labels = nullptr;
            if (PyDict_Check(item)) {
                ids = PyDict_GetItemString(item, "input_ids");
                if (ids == nullptr)
                    throw std::invalid_argument("example " + std::to_string(example) +
                                                ": a mapping needs an 'input_ids' key");
                labels = PyDict_GetItemString(item, "labels");
            } else if ((PyTuple_Check(item) || PyList_Check(item)) && PySequence_Fast_GET_SIZE(item) == 2 &&
                       is_sequence_like(PySequence_Fast_GET_ITEM(item, 0)) &&
                       is_sequence_like(PySequence_Fast_GET_ITEM(item, 1))) {
                ids = PySequence_Fast_GET_ITEM(item, 0);
                labels = PySequence_Fast_GET_ITEM(item, 1);
            }
            IntView& view = views[static_cast<size_t>(i)];
            std::string problem = read_tokens(ids, view, id_stage_);
            if (!problem.empty())
                throw std::invalid_argument("example " + std::to_string(example) + ": input_ids " + problem);
            if (view.size == 0) throw std::invalid_argument(empty_message(example));
            IntView at = view;  // the staging vector does not move until the next example is read
            if (at.staged >= 0) at.data = id_stage_.data() + at.staged;
            at.visit([&](auto* p) {
                const int64_t bad = first_bad_token(p, at.size);
                if (bad >= 0) throw std::invalid_argument(bad_token_message(example, p[bad]));
            });
            if (labels != nullptr && labels != Py_None) {
                IntView label_view;
                label_stage_.clear();
                problem = read_tokens(labels, label_view, label_stage_);
                if (!problem.empty())
                    throw std::invalid_argument("example " + std::to_string(example) + ": labels " + problem);
                if (label_view.staged >= 0) label_view.data = label_stage_.data() + label_view.staged;
                if (label_view.size != at.size)
                    throw std::invalid_argument(label_count_message(example, label_view.size, at.size));
                mask_at[static_cast<size_t>(i)] = static_cast<int64_t>(mask_stage_.size());
                mask_stage_.resize(mask_stage_.size() + static_cast<size_t>(at.size));
                uint8_t* mask = mask_stage_.data() + mask_at[static_cast<size_t>(i)];
                at.visit([&](auto* p) {
                    label_view.visit([&](auto* l) {
                        if (labels_to_mask(p, l, at.size, mask) >= 0)
                            throw std::invalid_argument(label_value_message(example));
                    });
                });
            }
            if (view.size > max_len_ && overflow_ == Overflow::Error)
                throw std::invalid_argument(too_long_message(example, view.size));
        }
        py::gil_scoped_release unlocked;
        for (Py_ssize_t i = 0; i < n; ++i) {
            IntView& view = views[static_cast<size_t>(i)];
            if (view.staged >= 0) view.data = id_stage_.data() + view.staged;
            const int64_t m = mask_at[static_cast<size_t>(i)];
            const uint8_t* mask = m >= 0 ? mask_stage_.data() + m : nullptr;
            view.visit([&](auto* p) { push_example(next_example_++, p, mask, view.size); });
        }
    }

    // Rows decided so far, as flat arrays; clears them.
    py::tuple pop_ready() {
        BusyGuard busy(busy_);
        py::tuple out = py::make_tuple(out_ids_.release(), out_labels_.release(), out_positions_.release(),
                                       row_offsets_.release(), out_cu_seqlens_.release(), out_examples_.release(),
                                       row_segment_offsets_.release());
        row_offsets_.push_back(0);
        row_segment_offsets_.push_back(0);
        return out;
    }

    void flush() {
        BusyGuard busy(busy_);
        py::gil_scoped_release unlocked;
        while (!pending_.empty()) step();
        std::vector<RowKey> rows(open_rows_.begin(), open_rows_.end());
        std::sort(rows.begin(), rows.end(), [](const RowKey& a, const RowKey& b) { return a.row_id < b.row_id; });
        open_rows_.clear();
        for (const RowKey& key : rows) emit(key.row_slot);
    }

    int64_t pending_count() const { return static_cast<int64_t>(pending_.size()); }
    int64_t open_count() const { return static_cast<int64_t>(open_rows_.size()); }
    int64_t examples_added() const { return next_example_; }
    int64_t ready_rows() const { return static_cast<int64_t>(row_offsets_.size()) - 1; }
    int64_t max_len() const { return max_len_; }
    int64_t window() const { return window_; }
    int64_t max_open() const { return max_open_; }

private:
    static std::string empty_message(int64_t example) {
        return "example " + std::to_string(example) + " is empty; drop empty examples before packing";
    }
    std::string too_long_message(int64_t example, int64_t len) const {
        return "example " + std::to_string(example) + " has " + std::to_string(len) + " tokens, more than max_len=" +
               std::to_string(max_len_) + "; raise max_len or pass overflow='truncate' or 'split'";
    }
    static std::string label_count_message(int64_t example, int64_t labels, int64_t ids) {
        return "example " + std::to_string(example) + ": labels have " + std::to_string(labels) +
               " entries but input_ids " + std::to_string(ids) + "; give one label per token";
    }
    static std::string label_value_message(int64_t example) {
        return "example " + std::to_string(example) +
               ": labels must equal input_ids where loss is taken and be -100 elsewhere "
               "(pass unshifted labels; the model shifts them)";
    }

    static IntView read_flat(py::object values, const char* what) {
        py::array array = py::array::ensure(values);
        if (!array) {
            PyErr_Clear();
            throw std::invalid_argument(std::string(what) + " must be a 1-D array of integers");
        }
        IntView view;
        const std::string problem = read_array(array, view);
        if (!problem.empty()) throw std::invalid_argument(std::string(what) + " " + problem);
        return view;
    }

    // The example whose tokens hold flat position `pos` (offsets strictly increasing by then).
    static int64_t example_at(const Offsets& o, int64_t pos) {
        int64_t lo = 0, hi = o.count - 1;  // o[lo] <= pos < o[hi]
        while (hi - lo > 1) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (o[mid] <= pos) lo = mid;
            else hi = mid;
        }
        return lo;
    }

    // Validates every example of the call before adding any, so a bad one leaves the packer unchanged.
    void add_flat(const IntView& ids, const Offsets& o, py::object mask_obj, py::object labels_obj,
                  py::object label_offsets_obj) {
        if (o.count < 1) throw std::invalid_argument("offsets must hold at least one entry (n + 1 for n examples)");
        const int64_t n = o.count - 1;
        const int64_t first = o[0];
        if (first < 0 || first > ids.size)
            throw std::invalid_argument("offsets point outside the flat id array: offsets[0] is " +
                                        std::to_string(first) + " for " + std::to_string(ids.size) + " token ids");
        for (int64_t i = 0; i < n; ++i) {
            const int64_t len = o[i + 1] - o[i];
            const int64_t example = next_example_ + i;
            if (len < 0)
                throw std::invalid_argument("offsets must be non-decreasing: offsets[" + std::to_string(i + 1) +
                                            "] = " + std::to_string(o[i + 1]) + " < offsets[" + std::to_string(i) +
                                            "] = " + std::to_string(o[i]) + " (example " + std::to_string(example) +
                                            ")");
            if (len == 0) throw std::invalid_argument(empty_message(example));
            if (len > max_len_ && overflow_ == Overflow::Error)
                throw std::invalid_argument(too_long_message(example, len));
        }
        const int64_t last = o[n];
        if (last > ids.size)
            throw std::invalid_argument("offsets point outside the flat id array: the last offset is " +
                                        std::to_string(last) + " but there are " + std::to_string(ids.size) +
                                        " token ids");
        if (!mask_obj.is_none() && !labels_obj.is_none())
            throw std::invalid_argument("pass labels or a label mask, not both");
        ids.visit([&](auto* p) {
            const int64_t bad = first_bad_token(p + first, last - first);
            if (bad >= 0) {
                const int64_t i = example_at(o, first + bad);
                throw std::invalid_argument(bad_token_message(next_example_ + i, p[first + bad]));
            }
        });
        // The mask of flat position t is mask[t] (a caller's mask) or mask_stage_[t - first] (from labels).
        py::array_t<uint8_t, py::array::c_style> mask_array;
        const uint8_t* mask = nullptr;
        bool staged_mask = false;
        if (!mask_obj.is_none()) {
            py::array m = py::array::ensure(mask_obj);
            if (!m || m.ndim() != 1 || m.size() != ids.size) {
                PyErr_Clear();
                throw std::invalid_argument("label mask must be a 1-D array as long as the token ids");
            }
            const char kind = m.dtype().kind();
            if (kind != 'b' && !(kind == 'u' && m.itemsize() == 1))
                throw std::invalid_argument("label mask must be a bool or uint8 array");
            mask_array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(m);
            mask = mask_array.data();
        } else if (!labels_obj.is_none()) {
            stage_labels(ids, o, labels_obj, label_offsets_obj);
            mask = mask_stage_.data();
            staged_mask = true;
        }
        py::gil_scoped_release unlocked;
        ids.visit([&](auto* p) {
            for (int64_t i = 0; i < n; ++i) {
                const int64_t begin = o[i];
                const uint8_t* m = mask == nullptr ? nullptr : mask + (staged_mask ? begin - first : begin);
                push_example(next_example_++, p + begin, m, o[i + 1] - begin);
            }
        });
    }

    // Checks flat labels against the ids (one label per token, -100 or the token id) and writes the
    // loss mask of flat positions [o[0], o[n]) to mask_stage_.
    void stage_labels(const IntView& ids, const Offsets& o, py::object labels_obj, py::object label_offsets_obj) {
        const IntView labels = read_flat(labels_obj, "labels");
        const int64_t n = o.count - 1, first = o[0];
        Offsets lo = o;
        if (label_offsets_obj.is_none()) {
            if (labels.size != ids.size)
                throw std::invalid_argument("labels must be as long as the token ids (one label per token), got " +
                                            std::to_string(labels.size) + " for " + std::to_string(ids.size));
        } else {
            lo = read_offsets(label_offsets_obj, "label offsets");
            if (lo.count != o.count)
                throw std::invalid_argument("label offsets must have one entry per id offset, got " +
                                            std::to_string(lo.count) + " for " + std::to_string(o.count));
            if (lo[0] < 0) throw std::invalid_argument("label offsets point outside the flat labels");
            for (int64_t i = 0; i < n; ++i) {
                const int64_t want = o[i + 1] - o[i], got = lo[i + 1] - lo[i];
                if (got != want) throw std::invalid_argument(label_count_message(next_example_ + i, got, want));
            }
            if (lo[n] > labels.size) throw std::invalid_argument("label offsets point outside the flat labels");
        }
        mask_stage_.resize(static_cast<size_t>(o[n] - first));
        ids.visit([&](auto* p) {
            labels.visit([&](auto* l) {
                for (int64_t i = 0; i < n; ++i) {
                    const int64_t len = o[i + 1] - o[i];
                    if (labels_to_mask(p + o[i], l + lo[i], len, mask_stage_.data() + (o[i] - first)) >= 0)
                        throw std::invalid_argument(label_value_message(next_example_ + i));
                }
            });
        });
    }

    // Adds one checked example: whole, truncated to max_len, or split into max_len pieces.
    template <typename T>
    void push_example(int64_t example, const T* ids, const uint8_t* mask, int64_t len) {
        if (len > max_len_ && overflow_ == Overflow::Truncate) len = max_len_;
        for (int64_t begin = 0; begin < len; begin += max_len_) {
            push_item(example, ids + begin, mask ? mask + begin : nullptr, std::min(len - begin, max_len_));
        }
    }

    template <typename T>
    void push_item(int64_t example, const T* ids, const uint8_t* mask, int64_t len) {
        const int size_class = size_class_of(len);
        const size_t room = static_cast<size_t>(std::min<int64_t>(int64_t{1} << size_class, max_len_));
        std::vector<int64_t>& free_slots = free_items_[size_class];
        int64_t slot;
        if (!free_slots.empty()) {
            slot = free_slots.back();
            free_slots.pop_back();
        } else {
            slot = static_cast<int64_t>(items_.size());
            items_.emplace_back();
            items_.back().size_class = size_class;
            items_.back().ids.reset(new int32_t[room]);
        }
        Item& item = items_[slot];
        item.example = example;
        item.length = len;
        copy_to_int32(ids, item.ids.get(), len);
        item.masked = mask != nullptr && !all_set(mask, len);
        if (item.masked) {
            if (!item.mask) item.mask.reset(new uint8_t[room]);
            std::memcpy(item.mask.get(), mask, static_cast<size_t>(len));
        }
        pending_.insert(PendingKey{len, next_arrival_++, slot});
        while (static_cast<int64_t>(pending_.size()) > window_) step();
    }

    void step() {
        auto first = pending_.begin();
        PendingKey key = *first;
        pending_.erase(first);
        place(key);
    }

    void place(const PendingKey& item) {
        auto fit = open_rows_.lower_bound(RowKey{item.length, std::numeric_limits<int64_t>::min(), 0});
        if (fit != open_rows_.end()) {
            RowKey row = *fit;
            open_rows_.erase(fit);
            put(row, item);
            return;
        }
        if (static_cast<int64_t>(open_rows_.size()) >= max_open_) {
            RowKey fullest = *open_rows_.begin();
            open_rows_.erase(open_rows_.begin());
            fill(fullest);
            emit(fullest.row_slot);
        }
        int64_t row_slot;
        if (!free_rows_.empty()) {
            row_slot = free_rows_.back();
            free_rows_.pop_back();
        } else {
            row_slot = static_cast<int64_t>(rows_.size());
            rows_.emplace_back();
        }
        Row& row = rows_[row_slot];
        row.row_id = next_row_id_++;
        row.remaining = max_len_;
        row.item_slots.clear();
        put(RowKey{max_len_, row.row_id, row_slot}, item);
    }

    // Adds the item to a row that is not in open_rows_; re-inserts the row or emits it when full.
    void put(RowKey row, const PendingKey& item) {
        Row& r = rows_[row.row_slot];
        r.item_slots.push_back(item.slot);
        r.remaining -= item.length;
        row.remaining = r.remaining;
        if (row.remaining == 0) emit(row.row_slot);
        else open_rows_.insert(row);
    }

    void fill(RowKey& row) {
        Row& r = rows_[row.row_slot];
        while (r.remaining > 0 && !pending_.empty()) {
            // First key in pending order with length <= remaining: longest fitting, earliest among equals.
            auto it = pending_.lower_bound(PendingKey{r.remaining, std::numeric_limits<int64_t>::min(), 0});
            if (it == pending_.end()) break;
            r.item_slots.push_back(it->slot);
            r.remaining -= it->length;
            pending_.erase(it);
        }
        row.remaining = r.remaining;
    }

    void emit(int64_t row_slot) {
        Row& r = rows_[row_slot];
        const size_t row_len = static_cast<size_t>(max_len_ - r.remaining);
        int64_t* ids = out_ids_.extend(row_len);
        int64_t* labels = out_labels_.extend(row_len);
        int64_t* positions = out_positions_.extend(row_len);
        int32_t* cu = out_cu_seqlens_.extend(r.item_slots.size() + 1);
        int64_t* examples = out_examples_.extend(r.item_slots.size());
        size_t at = 0;
        cu[0] = 0;
        for (size_t k = 0; k < r.item_slots.size(); ++k) {
            const int64_t slot = r.item_slots[k];
            const Item& item = items_[slot];
            const size_t len = static_cast<size_t>(item.length);
            write_item(item.ids.get(), item.masked ? item.mask.get() : nullptr, len, ids + at, labels + at,
                       positions + at);
            at += len;
            cu[k + 1] = static_cast<int32_t>(at);
            examples[k] = item.example;
            free_items_[item.size_class].push_back(slot);
        }
        row_offsets_.push_back(static_cast<int64_t>(out_ids_.size()));
        row_segment_offsets_.push_back(static_cast<int64_t>(out_examples_.size()));
        r.item_slots.clear();
        free_rows_.push_back(row_slot);
    }

    int64_t max_len_, window_, max_open_;
    Overflow overflow_ = Overflow::Error;
    int64_t next_example_ = 0, next_arrival_ = 0, next_row_id_ = 0;
    std::atomic<bool> busy_{false};

    std::vector<Item> items_;
    std::vector<int64_t> free_items_[33];  // free slots by size class (max_len < 2^31)
    NodeCache pending_nodes_, row_nodes_;  // declared before the sets that use them
    std::set<PendingKey, PendingOrder, CachingAllocator<PendingKey>> pending_{
        PendingOrder(), CachingAllocator<PendingKey>(&pending_nodes_)};
    std::vector<Row> rows_;
    std::vector<int64_t> free_rows_;
    std::set<RowKey, RowOrder, CachingAllocator<RowKey>> open_rows_{RowOrder(), CachingAllocator<RowKey>(&row_nodes_)};

    Buffer<int64_t> out_ids_, out_labels_, out_positions_, row_offsets_, out_examples_, row_segment_offsets_;
    // Per call: ids read from Python lists, labels of one example, the loss mask made from labels.
    std::vector<int64_t> id_stage_, label_stage_;
    std::vector<uint8_t> mask_stage_;
    Buffer<int32_t> out_cu_seqlens_;
};

}  // namespace

PYBIND11_MODULE(_packer, m) {
    m.doc() = "Streaming best-fit-decreasing sequence packer (see csrc/packer.cpp for the exact algorithm).";
    py::class_<Packer>(m, "Packer")
        .def(py::init<int64_t, int64_t, const std::string&, int64_t>(), py::arg("max_len"), py::arg("window") = 1000,
             py::arg("overflow") = "error", py::arg("max_open") = 64)
        .def("add", &Packer::add, py::arg("ids"), py::arg("label_mask") = py::none(),
             "Add one example: 1-D integer ids (any integer dtype, values in [0, 2**31 - 1]) and an optional "
             "1-D bool/uint8 label mask (nonzero = loss).")
        .def("add_many", &Packer::add_many, py::arg("flat_ids"), py::arg("offsets"),
             py::arg("flat_label_mask") = py::none(), py::kw_only(), py::arg("flat_labels") = py::none(),
             py::arg("label_offsets") = py::none(),
             "Add n examples: flat 1-D integer ids [T] (read in place, values in [0, 2**31 - 1]), n + 1 "
             "non-decreasing offsets (int32 or int64 read in place; the layout of an Arrow list column), and "
             "per token either a bool/uint8 mask [T] or integer labels (-100 = no loss, else the token id) "
             "laid out by label_offsets (default: the ids' offsets, labels as long as the ids). Everything is "
             "checked before anything is added: ValueError names the first bad example.")
        .def("add_list", &Packer::add_list, py::arg("examples"),
             "Add a list of examples, each a 1-D integer sequence (numpy array, list or tuple of ints), an "
             "(input_ids, labels) pair or a dict with 'input_ids' and optional 'labels' (-100 = no loss). "
             "Everything is checked before anything is added: ValueError names the first bad example.")
        .def("pop_ready", &Packer::pop_ready,
             "Return and clear the rows decided so far: (input_ids int64[T], labels int64[T], position_ids "
             "int64[T], row_offsets int64[R+1], cu_seqlens int32[S+R] (each row's own 0..len), "
             "example_index int64[S], row_segment_offsets int64[R+1]). The arrays' memory is recycled "
             "for later rows once numpy frees them.")
        .def("flush", &Packer::flush, "Place every pending example and emit every open row.")
        .def_property_readonly("pending_count", &Packer::pending_count)
        .def_property_readonly("open_count", &Packer::open_count)
        .def_property_readonly("examples_added", &Packer::examples_added)
        .def_property_readonly("ready_rows", &Packer::ready_rows)
        .def_property_readonly("max_len", &Packer::max_len)
        .def_property_readonly("window", &Packer::window)
        .def_property_readonly("max_open", &Packer::max_open);
}
