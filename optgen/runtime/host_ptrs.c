/* The fast step's per-tensor reads, one C call per list instead of a Python call per tensor (~100 ns each on
 * the development machine: 200 tensors and their two states cost ~95 us a step in Python, ~3 us here).
 *
 * A tensor's data pointer comes from torch's own accessor, the function Inductor's C++ wrappers call
 * (torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr): its address is handed to og_set_accessor.
 * It throws a C++ exception on anything but a tensor, which C cannot catch: every list handed here holds only
 * tensors, checked by the caller (dynamo's TensorGuards) or built by the optimizer itself.
 *
 * Loaded with ctypes.PyDLL: the GIL is held during the calls; list items are borrowed references. Only
 * CPython's stable ABI is used, declared here, so no Python headers are needed to build it. */
#include <stddef.h>
#include <stdint.h>

typedef void *(*og_data_ptr_fn)(void *tensor);

extern void *PyList_GetItem(void *list, ptrdiff_t index);
extern ptrdiff_t PyList_Size(void *list);

static og_data_ptr_fn og_data_ptr;

void og_set_accessor(void *fn) { og_data_ptr = (og_data_ptr_fn)fn; }

/* 1 when the list `tensors` holds exactly the objects whose addresses (Python's id) are `ids`, in order, and
 * their data pointers are `ptrs`; ids are compared first, so data pointers are read only from those objects. */
int og_same_tensors(void *tensors, const int64_t *ids, const int64_t *ptrs, int64_t n) {
    if (PyList_Size(tensors) != n) return 0;
    for (int64_t i = 0; i < n; ++i)
        if ((int64_t)(intptr_t)PyList_GetItem(tensors, i) != ids[i]) return 0;
    for (int64_t i = 0; i < n; ++i)
        if ((int64_t)(intptr_t)og_data_ptr(PyList_GetItem(tensors, i)) != ptrs[i]) return 0;
    return 1;
}

/* 1 when the data pointers of the list `tensors` (n of them) are `ptrs`. */
int og_same_ptrs(void *tensors, const int64_t *ptrs, int64_t n) {
    if (PyList_Size(tensors) != n) return 0;
    for (int64_t i = 0; i < n; ++i)
        if ((int64_t)(intptr_t)og_data_ptr(PyList_GetItem(tensors, i)) != ptrs[i]) return 0;
    return 1;
}

/* Writes the data pointers of the list `tensors` into `ptrs` (n slots); 1 when any differed, -1 when the list
 * does not hold n tensors (nothing written). */
int og_update_ptrs(void *tensors, int64_t *ptrs, int64_t n) {
    if (PyList_Size(tensors) != n) return -1;
    int changed = 0;
    for (int64_t i = 0; i < n; ++i) {
        int64_t ptr = (int64_t)(intptr_t)og_data_ptr(PyList_GetItem(tensors, i));
        changed |= ptr != ptrs[i];
        ptrs[i] = ptr;
    }
    return changed;
}
