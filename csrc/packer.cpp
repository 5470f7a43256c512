// Streaming best-fit-decreasing sequence packer, bound with pybind11 (no torch inside).
//
// The algorithm (engine/packing_reference.py reproduces it step for step; keep them in sync):
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
// Speed (the algorithm above is the whole contract; none of this changes a row):
// - Token ids are kept as int32 while pending (ids outside the int32 range are rejected), read
//   straight from the caller's numpy buffer in whatever integer dtype it has (no cast copy), and
//   an all-ones label mask is not stored at all.
// - A row is written in one pass per item: input_ids, labels and position_ids (int64) together,
//   straight into the flat output arrays that pop_ready hands to numpy without copying.
// - Output memory is recycled: when numpy frees an array from pop_ready, its block goes back to a
//   small pool the next rows are written into, so steady streaming takes no fresh pages (page
//   faults and kernel page zeroing were a third of the time before).
// - add, add_many and flush release the GIL while they work; one packer serves one thread at a
//   time (a second concurrent call raises RuntimeError).
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
#include <utility>
#include <vector>

namespace py = pybind11;

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

// A 1-D integer numpy array read in place (any integer dtype; a copy only for odd layouts).
class TokenView {
public:
    TokenView(py::array values, const char* what) {
        if (values.ndim() != 1) throw std::invalid_argument(std::string(what) + " must be a 1-D array");
        const char kind = values.dtype().kind();
        if (values.size() == 0 && kind != 'i' && kind != 'u') values = py::array_t<int64_t>(0);
        else if (kind != 'i' && kind != 'u')
            throw std::invalid_argument(std::string(what) + " must be integers, got dtype " +
                                        std::string(py::str(values.dtype())));
        if (!(try_as<int64_t>(values) || try_as<int32_t>(values) || try_as<uint16_t>(values) ||
              try_as<uint32_t>(values) || try_as<int16_t>(values) || try_as<uint8_t>(values) ||
              try_as<int8_t>(values) || try_as<uint64_t>(values))) {
            // Not contiguous or not native byte order: one converting copy.
            keep_ = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(values);
            data_ = keep_.data();
            type_ = 'l';
        }
        size_ = values.size();
    }
    int64_t size() const { return size_; }

    // Calls f(const T* data) with the array's own element type.
    template <typename F>
    void visit(F&& f) const {
        switch (type_) {
            case 'l': return f(static_cast<const int64_t*>(data_));
            case 'i': return f(static_cast<const int32_t*>(data_));
            case 'H': return f(static_cast<const uint16_t*>(data_));
            case 'I': return f(static_cast<const uint32_t*>(data_));
            case 'h': return f(static_cast<const int16_t*>(data_));
            case 'B': return f(static_cast<const uint8_t*>(data_));
            case 'b': return f(static_cast<const int8_t*>(data_));
            case 'L': return f(static_cast<const uint64_t*>(data_));
        }
    }

private:
    template <typename T>
    bool try_as(const py::array& values) {
        if (!py::isinstance<py::array_t<T, py::array::c_style>>(values)) return false;
        keep_ = values;
        data_ = values.data();
        type_ = code<T>();
        return true;
    }
    template <typename T>
    static constexpr char code() {
        if (std::is_same_v<T, int64_t>) return 'l';
        if (std::is_same_v<T, int32_t>) return 'i';
        if (std::is_same_v<T, uint16_t>) return 'H';
        if (std::is_same_v<T, uint32_t>) return 'I';
        if (std::is_same_v<T, int16_t>) return 'h';
        if (std::is_same_v<T, uint8_t>) return 'B';
        if (std::is_same_v<T, int8_t>) return 'b';
        return 'L';
    }

    py::array keep_;
    const void* data_ = nullptr;
    char type_ = 'l';
    int64_t size_ = 0;
};

// True when every value of p[0:n] fits in int32.
template <typename T>
bool fits_int32(const T* p, int64_t n) {
    if constexpr (sizeof(T) < 4 || (sizeof(T) == 4 && std::is_signed_v<T>)) {
        return true;
    } else if constexpr (std::is_signed_v<T>) {
        uint64_t outside = 0;
        for (int64_t i = 0; i < n; ++i) outside |= static_cast<uint64_t>(static_cast<int64_t>(p[i]) + 2147483648LL);
        return (outside >> 32) == 0;
    } else {
        uint64_t outside = 0;
        for (int64_t i = 0; i < n; ++i) outside |= static_cast<uint64_t>(p[i]);
        return (outside >> 31) == 0;
    }
}

// Writes one item's tokens into the three int64 outputs in a single pass (vectorised by the compiler).
// Plain stores, not streaming ones: the pooled output blocks mostly stay in cache, and measured
// streaming stores were slower.
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

    // One example: ids (1-D integer array), mask (1-D, same length, nonzero = loss) or None.
    void add(py::array ids, py::object mask) {
        BusyGuard busy(busy_);
        TokenView view(ids, "token ids");
        const int64_t offsets[2] = {0, view.size()};
        add_checked(view, offsets, 1, mask);
    }

    // Many examples: flat ids, offsets (n + 1 non-decreasing positions into ids), flat mask or None.
    void add_many(py::array flat_ids, py::array offsets, py::object flat_mask) {
        BusyGuard busy(busy_);
        TokenView view(flat_ids, "token ids");
        if (offsets.ndim() != 1) throw std::invalid_argument("offsets must be a 1-D array");
        const char kind = offsets.dtype().kind();
        if (kind != 'i' && kind != 'u' && offsets.size() != 0)
            throw std::invalid_argument("offsets must be integers, got dtype " + std::string(py::str(offsets.dtype())));
        auto offs = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(offsets);
        if (offs.size() < 1) throw std::invalid_argument("offsets must hold at least one entry (n + 1 for n examples)");
        const int64_t* o = offs.data();
        const int64_t n = static_cast<int64_t>(offs.size()) - 1;
        if (o[0] < 0 || o[n] > view.size()) throw std::invalid_argument("offsets point outside the flat id array");
        add_checked(view, o, n, flat_mask);
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
    // Validates every example of the call before adding any, so a bad one leaves the packer unchanged.
    void add_checked(const TokenView& ids, const int64_t* o, int64_t n, py::object mask_obj) {
        py::array_t<uint8_t, py::array::c_style> mask;
        const bool has_mask = !mask_obj.is_none();
        if (has_mask) {
            py::array m = py::array::ensure(mask_obj);
            if (!m || m.ndim() != 1 || m.size() != ids.size())
                throw std::invalid_argument("label mask must be a 1-D array as long as the token ids");
            char kind = m.dtype().kind();
            if (kind != 'b' && !(kind == 'u' && m.itemsize() == 1))
                throw std::invalid_argument("label mask must be a bool or uint8 array");
            mask = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(m);
        }
        for (int64_t i = 0; i < n; ++i) {
            const int64_t len = o[i + 1] - o[i];
            const int64_t example = next_example_ + i;
            if (len < 0) throw std::invalid_argument("offsets must be non-decreasing");
            if (len == 0)
                throw std::invalid_argument("example " + std::to_string(example) +
                                            " is empty; drop empty examples before packing");
            if (len > max_len_ && overflow_ == Overflow::Error)
                throw std::invalid_argument("example " + std::to_string(example) + " has " + std::to_string(len) +
                                            " tokens, more than max_len=" + std::to_string(max_len_) +
                                            "; raise max_len or pass overflow='truncate' or 'split'");
        }
        const uint8_t* mk = has_mask ? mask.data() : nullptr;
        const int64_t first = n > 0 ? o[0] : 0, last = n > 0 ? o[n] : 0;
        py::gil_scoped_release unlocked;
        bool fits = true;
        ids.visit([&](auto* id) { fits = fits_int32(id + first, last - first); });
        if (!fits) throw std::invalid_argument("token ids must fit in int32 (-2147483648 to 2147483647)");
        ids.visit([&](auto* id) {
            for (int64_t i = 0; i < n; ++i) {
                const int64_t example = next_example_++;
                int64_t begin = o[i];
                int64_t end = o[i + 1];
                if (end - begin > max_len_ && overflow_ == Overflow::Truncate) end = begin + max_len_;
                while (begin < end) {
                    const int64_t piece_end = std::min(end, begin + max_len_);
                    push_item(example, id + begin, mk ? mk + begin : nullptr, piece_end - begin);
                    begin = piece_end;
                }
            }
        });
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
        int32_t* dst = item.ids.get();
        for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<int32_t>(ids[t]);
        uint8_t all = 1;
        if (mask) {
            for (int64_t t = 0; t < len; ++t) all &= (mask[t] != 0);
        }
        item.masked = !all;
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
    std::set<PendingKey, PendingOrder> pending_;
    std::vector<Row> rows_;
    std::vector<int64_t> free_rows_;
    std::set<RowKey, RowOrder> open_rows_;

    Buffer<int64_t> out_ids_, out_labels_, out_positions_, row_offsets_, out_examples_, row_segment_offsets_;
    Buffer<int32_t> out_cu_seqlens_;
};

}  // namespace

PYBIND11_MODULE(_packer, m) {
    m.doc() = "Streaming best-fit-decreasing sequence packer (see csrc/packer.cpp for the exact algorithm).";
    py::class_<Packer>(m, "Packer")
        .def(py::init<int64_t, int64_t, const std::string&, int64_t>(), py::arg("max_len"), py::arg("window") = 1000,
             py::arg("overflow") = "error", py::arg("max_open") = 64)
        .def("add", &Packer::add, py::arg("ids"), py::arg("label_mask") = py::none(),
             "Add one example: 1-D integer ids (any integer dtype, values within int32) and an optional "
             "1-D bool/uint8 label mask (nonzero = loss).")
        .def("add_many", &Packer::add_many, py::arg("flat_ids"), py::arg("offsets"),
             py::arg("flat_label_mask") = py::none(),
             "Add n examples: flat 1-D integer ids (read in place, values within int32), n + 1 integer "
             "offsets, optional flat bool/uint8 label mask.")
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
