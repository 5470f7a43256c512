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
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
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

struct Item {
    int64_t example = 0;
    std::vector<int64_t> ids;
    std::vector<uint8_t> mask;  // empty when every token takes loss
};

struct Row {
    int64_t row_id = 0;
    int64_t remaining = 0;
    std::vector<int64_t> item_slots;
};

// A growable array that never zero-fills and hands its malloc'd memory to numpy without copying.
template <typename T>
class Buffer {
public:
    Buffer() = default;
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
    // Moves the contents into a 1-D numpy array and leaves the buffer empty, with room for `hint`.
    py::array_t<T> release(size_t hint) {
        T* data = data_;
        const size_t n = size_;
        if (data == nullptr) data = static_cast<T*>(std::malloc(sizeof(T)));
        if (data == nullptr) throw std::bad_alloc();
        data_ = nullptr;
        size_ = capacity_ = 0;
        if (hint) grow(hint);
        py::capsule owner(data, [](void* p) { std::free(p); });
        return py::array_t<T>({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))}, data, owner);
    }

private:
    void grow(size_t need) {
        size_t capacity = std::max<size_t>({need, capacity_ * 2, 1024 / sizeof(T)});
        T* data = static_cast<T*>(std::realloc(data_, capacity * sizeof(T)));
        if (data == nullptr) throw std::bad_alloc();
        data_ = data;
        capacity_ = capacity;
    }

    T* data_ = nullptr;
    size_t size_ = 0, capacity_ = 0;
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
        auto ids64 = as_int64(ids, "token ids");
        std::vector<int64_t> offsets = {0, static_cast<int64_t>(ids64.size())};
        add_checked(ids64, offsets.data(), 1, mask);
    }

    // Many examples: flat ids, offsets (n + 1 non-decreasing positions into ids), flat mask or None.
    void add_many(py::array flat_ids, py::array offsets, py::object flat_mask) {
        auto ids64 = as_int64(flat_ids, "token ids");
        auto offs = as_int64(offsets, "offsets");
        if (offs.size() < 1) throw std::invalid_argument("offsets must hold at least one entry (n + 1 for n examples)");
        const int64_t* o = offs.data();
        const int64_t n = static_cast<int64_t>(offs.size()) - 1;
        if (o[0] < 0 || o[n] > static_cast<int64_t>(ids64.size()))
            throw std::invalid_argument("offsets point outside the flat id array");
        add_checked(ids64, o, n, flat_mask);
    }

    // Rows decided so far, as flat arrays; clears them.
    py::tuple pop_ready() {
        // Room for as much as last time, so steady streaming rarely reallocates.
        const size_t tokens = out_ids_.size(), segments = out_examples_.size(), rows = row_offsets_.size();
        py::tuple out = py::make_tuple(out_ids_.release(tokens), out_labels_.release(tokens),
                                       out_positions_.release(tokens), row_offsets_.release(rows),
                                       out_cu_seqlens_.release(segments + rows), out_examples_.release(segments),
                                       row_segment_offsets_.release(rows));
        row_offsets_.push_back(0);
        row_segment_offsets_.push_back(0);
        return out;
    }

    void flush() {
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
    static py::array_t<int64_t, py::array::c_style> as_int64(py::array values, const char* what) {
        if (values.ndim() != 1) throw std::invalid_argument(std::string(what) + " must be a 1-D array");
        char kind = values.dtype().kind();
        if (kind != 'i' && kind != 'u' && !(values.size() == 0))
            throw std::invalid_argument(std::string(what) + " must be integers, got dtype " +
                                        std::string(py::str(values.dtype())));
        return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(values);
    }

    // Validates every example of the call before adding any, so a bad one leaves the packer unchanged.
    void add_checked(const py::array_t<int64_t, py::array::c_style>& ids, const int64_t* o, int64_t n,
                     py::object mask_obj) {
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
        const int64_t* id = ids.data();
        const uint8_t* mk = has_mask ? mask.data() : nullptr;
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
    }

    void push_item(int64_t example, const int64_t* ids, const uint8_t* mask, int64_t len) {
        int64_t slot;
        if (!free_items_.empty()) {
            slot = free_items_.back();
            free_items_.pop_back();
        } else {
            slot = static_cast<int64_t>(items_.size());
            items_.emplace_back();
        }
        Item& item = items_[slot];
        item.example = example;
        item.ids.assign(ids, ids + len);
        if (mask) item.mask.assign(mask, mask + len);
        else item.mask.clear();
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
        int32_t cu = 0;
        out_cu_seqlens_.push_back(0);
        for (int64_t slot : r.item_slots) {
            Item& item = items_[slot];
            const size_t len = item.ids.size();
            const int64_t* src = item.ids.data();
            int64_t* ids = out_ids_.extend(len);
            int64_t* lab = out_labels_.extend(len);
            int64_t* pos = out_positions_.extend(len);
            std::memcpy(ids, src, len * sizeof(int64_t));
            if (item.mask.empty()) {
                std::memcpy(lab, src, len * sizeof(int64_t));
            } else {
                const uint8_t* m = item.mask.data();
                for (size_t t = 0; t < len; ++t) lab[t] = m[t] ? src[t] : -100;
            }
            lab[0] = -100;
            for (size_t t = 0; t < len; ++t) pos[t] = static_cast<int64_t>(t);
            cu += static_cast<int32_t>(len);
            out_cu_seqlens_.push_back(cu);
            out_examples_.push_back(item.example);
            free_items_.push_back(slot);
        }
        row_offsets_.push_back(static_cast<int64_t>(out_ids_.size()));
        row_segment_offsets_.push_back(static_cast<int64_t>(out_examples_.size()));
        r.item_slots.clear();
        free_rows_.push_back(row_slot);
    }

    int64_t max_len_, window_, max_open_;
    Overflow overflow_ = Overflow::Error;
    int64_t next_example_ = 0, next_arrival_ = 0, next_row_id_ = 0;

    std::vector<Item> items_;
    std::vector<int64_t> free_items_;
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
             "Add one example: 1-D integer ids and an optional 1-D bool/uint8 label mask (nonzero = loss).")
        .def("add_many", &Packer::add_many, py::arg("flat_ids"), py::arg("offsets"),
             py::arg("flat_label_mask") = py::none(),
             "Add n examples: flat 1-D integer ids, n + 1 int64 offsets, optional flat label mask.")
        .def("pop_ready", &Packer::pop_ready,
             "Return and clear the rows decided so far: (input_ids int64[T], labels int64[T], position_ids "
             "int64[T], row_offsets int64[R+1], cu_seqlens int32[S+R] (each row's own 0..len), "
             "example_index int64[S], row_segment_offsets int64[R+1]).")
        .def("flush", &Packer::flush, "Place every pending example and emit every open row.")
        .def_property_readonly("pending_count", &Packer::pending_count)
        .def_property_readonly("open_count", &Packer::open_count)
        .def_property_readonly("examples_added", &Packer::examples_added)
        .def_property_readonly("ready_rows", &Packer::ready_rows)
        .def_property_readonly("max_len", &Packer::max_len)
        .def_property_readonly("window", &Packer::window)
        .def_property_readonly("max_open", &Packer::max_open);
}
