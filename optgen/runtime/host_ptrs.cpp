/* The fast step's per-tensor checks and reads, one call per list instead of Python calls per tensor: is each
 * parameter the object it was, holding the TensorImpl it held, with the dtype, device, dispatch keys,
 * requires_grad, sizes, strides and data pointer it had; is each state tensor; has each parameter a gradient
 * of the metadata its gradient had, with storage behind it, and where is it (written into the C kernels'
 * pointer table). From Python that is ~250 ns a tensor on the development machine (a `.grad` read, dynamo's
 * TensorGuards on two lists, the pointers), here ~10 with caches warm.
 *
 * Tensors are reached through their TensorImpl and torch's C++ accessors (c10/core/TensorImpl.h, built against
 * the running torch's headers, linked to its libc10). The TensorImpl of a Python tensor is the pointer right
 * after its object header (THPVariable's cdata; `Tensor._cdata` from Python: host_ptrs.py checks they agree
 * before using this object, and for every tensor of a layout). It can change under the same object
 * (torch.utils.swap_tensors, module conversions with swap_module_params_on_conversion), and the old one may
 * then be freed: every call checks each object's current TensorImpl (and type: a class reassigned may read
 * `.grad` in Python) before it reads through the one it remembers. The objects are alive: the groups and the layout (host_ptrs.Layout) hold them. A gradient is read
 * through its parameter's TensorImpl in the same call. A metadata record is `[length, dtype, device, dispatch
 * keys, requires_grad, dim, sizes..., strides...]`; records of a list lie one after another.
 *
 * C++ to catch what torch's accessors throw (a tensor without storage, with symbolic sizes): every function
 * returns OG_UNREADABLE then, and the step takes the full path, where torch raises its own error. Loaded with
 * ctypes.PyDLL: the GIL is held; list items are borrowed references. */
#include <ATen/core/TensorBase.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/UndefinedTensorImpl.h>

#include <cstddef>
#include <cstdint>

extern "C" {
void *PyList_GetItem(void *list, std::ptrdiff_t index);
std::ptrdiff_t PyList_Size(void *list);
}

namespace {
using c10::TensorImpl;
constexpr int OG_UNREADABLE = -2;
constexpr int OG_NO_DATA = -3;
constexpr std::int64_t OG_FIXED = 6;  // a record's slots before sizes and strides

/* CPython's object header (reference count, type): a tensor's TensorImpl pointer follows it. */
struct ObjectHeader {
    std::ptrdiff_t refcount;
    void *type;
};

inline std::int64_t cdata_of(void *object) {
    return *reinterpret_cast<const std::int64_t *>(static_cast<const char *>(object) + sizeof(ObjectHeader));
}

inline TensorImpl *impl_at(const std::int64_t *impls, std::int64_t i) {
    return reinterpret_cast<TensorImpl *>(static_cast<std::intptr_t>(impls[i]));
}

/* The gradient of a parameter, or nullptr (none). at::Tensor is at::TensorBase and nothing more: a TensorImpl
 * pointer, the undefined tensor's a singleton. */
inline TensorImpl *grad_of(TensorImpl *param) {
    TensorImpl *grad = reinterpret_cast<const at::TensorBase &>(param->grad()).unsafeGetTensorImpl();
    return grad == c10::UndefinedTensorImpl::singleton() ? nullptr : grad;
}

inline std::int64_t data_of(TensorImpl *t) { return static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(t->mutable_data())); }

inline std::int64_t record_length(TensorImpl *t) { return OG_FIXED + 2 * t->dim(); }

/* Prefetches. A step usually finds these objects out of cache (a forward and backward ran since the last one),
 * and each tensor is a chain of them: TensorImpl -> its StorageImpl (the data pointer) and AutogradMeta (the
 * gradient) -> the gradient's TensorImpl -> its StorageImpl. Read one after another that is a cache miss per
 * link per tensor; each loop below starts the chains of the tensors OG_AHEAD, 2 OG_AHEAD and 3 OG_AHEAD ahead,
 * one link further the nearer they are, so the misses of many tensors overlap. */
constexpr std::int64_t OG_AHEAD = 4;

inline void prefetch_object(const void *object, std::size_t size) {
    const char *bytes = static_cast<const char *>(object);
    for (std::size_t at = 0; at < size; at += 64) __builtin_prefetch(bytes + at);
}

inline void prefetch_links(TensorImpl *t) {  // t is in cache: what it points to
    __builtin_prefetch(t->unsafe_storage().unsafeGetStorageImpl());
    __builtin_prefetch(t->autograd_meta());
}

/* Starts the chains of the tensors ahead of `i` (`grads`: through the gradients of parameters). */
inline void prefetch_ahead(const std::int64_t *impls, std::int64_t i, std::int64_t n, bool grads) {
    if (i + 3 * OG_AHEAD < n) prefetch_object(impl_at(impls, i + 3 * OG_AHEAD), sizeof(TensorImpl));
    if (i + 2 * OG_AHEAD < n) prefetch_links(impl_at(impls, i + 2 * OG_AHEAD));
    if (!grads) return;
    if (i + OG_AHEAD < n) {  // its AutogradMeta is in cache: the gradient's TensorImpl
        TensorImpl *grad = grad_of(impl_at(impls, i + OG_AHEAD));
        if (grad != nullptr) prefetch_object(grad, sizeof(TensorImpl));
    }
    if (i + 1 < n) {  // the next gradient's TensorImpl is in cache: its StorageImpl
        TensorImpl *grad = grad_of(impl_at(impls, i + 1));
        if (grad != nullptr) __builtin_prefetch(grad->unsafe_storage().unsafeGetStorageImpl());
    }
}

void write_record(TensorImpl *t, std::int64_t *out) {
    const c10::Device device = t->device();
    const std::int64_t dim = t->dim();
    out[0] = OG_FIXED + 2 * dim;
    out[1] = static_cast<std::int64_t>(t->dtype().toScalarType());
    out[2] = (static_cast<std::int64_t>(device.type()) << 16) | static_cast<std::uint16_t>(device.index());
    out[3] = static_cast<std::int64_t>(t->key_set().raw_repr());
    out[4] = t->requires_grad();
    out[5] = dim;
    const auto sizes = t->sizes();
    const auto strides = t->strides();
    for (std::int64_t d = 0; d < dim; ++d) {
        out[OG_FIXED + d] = sizes[d];
        out[OG_FIXED + dim + d] = strides[d];
    }
}

/* 1 when `t` has the record at `record`, which is followed by at least OG_FIXED slots. */
bool same_record(TensorImpl *t, const std::int64_t *record) {
    const std::int64_t dim = t->dim();
    const c10::Device device = t->device();
    if (record[0] != OG_FIXED + 2 * dim || record[5] != dim ||
        record[1] != static_cast<std::int64_t>(t->dtype().toScalarType()) ||
        record[2] != ((static_cast<std::int64_t>(device.type()) << 16) | static_cast<std::uint16_t>(device.index())) ||
        record[3] != static_cast<std::int64_t>(t->key_set().raw_repr()) || record[4] != t->requires_grad())
        return false;
    const auto sizes = t->sizes();
    const auto strides = t->strides();
    for (std::int64_t d = 0; d < dim; ++d)
        if (record[OG_FIXED + d] != sizes[d] || record[OG_FIXED + dim + d] != strides[d]) return false;
    return true;
}
}  // namespace

extern "C" {

/* The TensorImpl pointer of a Python tensor (see the header; host_ptrs.py compares it with `_cdata`). */
std::int64_t og_cdata(void *tensor) { return cdata_of(tensor); }

/* 1 when the list `objects` holds exactly the objects whose addresses (Python's id) are `ids`, in order, each
 * of the type `types[i]` (its class can be reassigned) holding the TensorImpl `impls[i]`: checked before
 * anything reads through `impls`. */
int og_same_objects(void *objects, const std::int64_t *ids, const std::int64_t *types, const std::int64_t *impls,
                    std::int64_t n) {
    if (PyList_Size(objects) != n) return 0;
    for (std::int64_t i = 0; i < n; ++i) {
        void *object = PyList_GetItem(objects, i);
        const ObjectHeader *header = static_cast<const ObjectHeader *>(object);
        if (static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(object)) != ids[i] ||
            static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(header->type)) != types[i] || cdata_of(object) != impls[i])
            return 0;
    }
    return 1;
}

/* The records of n tensors (`grads` nonzero: of the gradients of n parameters) into `out`, when its `cap`
 * slots suffice, and their data pointers into `ptrs`: returns the slots the records take (written or not); -1
 * when a parameter has no gradient, OG_UNREADABLE when torch throws. */
std::int64_t og_records(const std::int64_t *impls, std::int64_t n, int grads, std::int64_t *out, std::int64_t cap,
                        std::int64_t *ptrs) {
    std::int64_t used = 0;
    try {
        for (std::int64_t i = 0; i < n; ++i)
            if (grads && grad_of(impl_at(impls, i)) == nullptr) return -1;
        for (std::int64_t i = 0; i < n; ++i) {
            TensorImpl *t = grads ? grad_of(impl_at(impls, i)) : impl_at(impls, i);
            used += record_length(t);
        }
        if (used > cap) return used;
        std::int64_t at = 0;
        for (std::int64_t i = 0; i < n; ++i) {
            TensorImpl *t = grads ? grad_of(impl_at(impls, i)) : impl_at(impls, i);
            write_record(t, out + at);
            ptrs[i] = data_of(t);
            at += out[at];
        }
    } catch (...) {
        return OG_UNREADABLE;
    }
    return used;
}

/* 1 when each of n tensors has its record in `records` (`length` slots) and its data pointer in `ptrs`. */
int og_same(const std::int64_t *impls, std::int64_t n, const std::int64_t *records, std::int64_t length,
            const std::int64_t *ptrs) {
    std::int64_t at = 0;
    try {
        for (std::int64_t i = 0; i < n; ++i) {
            prefetch_ahead(impls, i, n, false);
            TensorImpl *t = impl_at(impls, i);
            if (at + OG_FIXED > length || !same_record(t, records + at) || data_of(t) != ptrs[i]) return 0;
            at += records[at];
        }
    } catch (...) {
        return OG_UNREADABLE;
    }
    return at == length;
}

/* The gradients of n parameters (checked by og_same_objects first): each must be there with its record
 * (`records`, `length` slots; contiguous, as the layout's were). Their data pointers are written into `table`,
 * all or none: 1 when any differed, 0 when none did. Nothing is written when a gradient is missing or its
 * metadata changed (-1), when a non-empty one's storage does not hold it (OG_NO_DATA: freed or shrunk in
 * place, untyped_storage().resize_; torch then reads a view's data pointer as its offset, not 0) or when torch
 * throws (OG_UNREADABLE). `scratch` holds n slots. */
int og_grads(const std::int64_t *param_impls, std::int64_t n, const std::int64_t *records, std::int64_t length,
             std::int64_t *table, std::int64_t *scratch) {
    std::int64_t at = 0;
    try {
        for (std::int64_t i = 0; i < n; ++i) {
            prefetch_ahead(param_impls, i, n, true);
            TensorImpl *grad = grad_of(impl_at(param_impls, i));
            if (grad == nullptr || at + OG_FIXED > length || !same_record(grad, records + at)) return -1;
            at += records[at];
            scratch[i] = data_of(grad);
            const std::int64_t numel = grad->numel();
            if (numel != 0) {
                const c10::StorageImpl *storage = grad->unsafe_storage().unsafeGetStorageImpl();
                const std::int64_t end = (grad->storage_offset() + numel) * static_cast<std::int64_t>(grad->dtype().itemsize());
                if (storage == nullptr || storage->data() == nullptr || static_cast<std::int64_t>(storage->nbytes()) < end)
                    return OG_NO_DATA;
            }
        }
    } catch (...) {
        return OG_UNREADABLE;
    }
    if (at != length) return -1;
    int changed = 0;
    for (std::int64_t i = 0; i < n; ++i) {
        changed |= scratch[i] != table[i];
        table[i] = scratch[i];
    }
    return changed;
}
}
