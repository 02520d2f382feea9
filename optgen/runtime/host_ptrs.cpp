/* The fast step's per-tensor reads, one call per list instead of a Python call per tensor (~90 ns each on the
 * development machine, ~10 here: 1000 tensors' data pointers compared in ~10 us against ~90).
 *
 * A tensor's data pointer comes from torch's own accessor, the function Inductor's C++ wrappers call
 * (torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr): its address is handed to og_set_accessor.
 * It throws a C++ exception on anything but a tensor and on a tensor whose data cannot be read (its storage
 * freed in place: untyped_storage().resize_(0)). This file is C++ only to catch those: every function returns
 * OG_UNREADABLE then, and the caller reads the same list from Python, where torch raises its own error.
 *
 * Loaded with ctypes.PyDLL: the GIL is held during the calls; list items are borrowed references. Only
 * CPython's stable ABI is used, declared here, so no Python headers are needed to build it. */
#include <cstddef>
#include <cstdint>

extern "C" {
void *PyList_GetItem(void *list, std::ptrdiff_t index);
std::ptrdiff_t PyList_Size(void *list);
}

namespace {
typedef void *(*data_ptr_fn)(void *tensor);
data_ptr_fn data_ptr_of;
constexpr int OG_UNREADABLE = -2;
constexpr int OG_NO_DATA = -3;

inline std::int64_t ptr_at(void *tensors, std::int64_t i) {
    return (std::int64_t)(std::intptr_t)data_ptr_of(PyList_GetItem(tensors, i));
}
}  // namespace

extern "C" {

void og_set_accessor(void *fn) { data_ptr_of = (data_ptr_fn)fn; }

/* 1 when the data pointers of the list `tensors` (n of them) are `ptrs`. */
int og_same_ptrs(void *tensors, const std::int64_t *ptrs, std::int64_t n) {
    if (PyList_Size(tensors) != n) return 0;
    try {
        for (std::int64_t i = 0; i < n; ++i)
            if (ptr_at(tensors, i) != ptrs[i]) return 0;
    } catch (...) {
        return OG_UNREADABLE;
    }
    return 1;
}

/* 1 when the list `tensors` holds exactly the objects whose addresses (Python's id) are `ids`, in order, and
 * their data pointers are `ptrs`; ids are compared first, so data pointers are read only from those objects. */
int og_same_tensors(void *tensors, const std::int64_t *ids, const std::int64_t *ptrs, std::int64_t n) {
    if (PyList_Size(tensors) != n) return 0;
    for (std::int64_t i = 0; i < n; ++i)
        if ((std::int64_t)(std::intptr_t)PyList_GetItem(tensors, i) != ids[i]) return 0;
    return og_same_ptrs(tensors, ptrs, n);
}

/* Writes the data pointers of the list `tensors` into `ptrs` (n slots), all or none: 1 when any differed, 0
 * when none did, -1 when the list does not hold n tensors, OG_NO_DATA (nothing written) when a tensor of
 * `numel[i]` > 0 elements has no data (a null pointer: its storage freed in place, which torch reads as 0).
 * `scratch` holds n slots. */
int og_update_ptrs(void *tensors, std::int64_t *ptrs, std::int64_t *scratch, const std::int64_t *numel, std::int64_t n) {
    if (PyList_Size(tensors) != n) return -1;
    try {
        for (std::int64_t i = 0; i < n; ++i) scratch[i] = ptr_at(tensors, i);
    } catch (...) {
        return OG_UNREADABLE;
    }
    for (std::int64_t i = 0; i < n; ++i)
        if (scratch[i] == 0 && numel[i] != 0) return OG_NO_DATA;
    int changed = 0;
    for (std::int64_t i = 0; i < n; ++i) {
        changed |= scratch[i] != ptrs[i];
        ptrs[i] = scratch[i];
    }
    return changed;
}
}
