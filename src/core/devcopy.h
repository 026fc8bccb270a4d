/* Batched device-to-host copies through the CUDA runtime, opened with
 * dlopen: the build needs no CUDA headers or libraries, and a machine
 * without CUDA simply finds no runtime.
 *
 * A batch is a list of segments (device address, byte count, device
 * index). ck_devcopy_plan gives each segment an aligned offset in one host
 * arena; ck_devcopy_run allocates that arena (pinned, or pageable), issues
 * every copy asynchronously on one stream per device, synchronises once and
 * hands the arena to the caller, who frees it with ck_devcopy_free.
 */
#ifndef CKPTIO_CORE_DEVCOPY_H
#define CKPTIO_CORE_DEVCOPY_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* The CUDA runtime's types as the ABI sees them: cudaError_t is an int
 * enum (0 = success), cudaStream_t an opaque pointer. */
typedef int ck_cuda_error;
typedef void *ck_cuda_stream;

/* cudaMemcpyKind's cudaMemcpyDeviceToHost. */
#define CK_CUDA_MEMCPY_DEVICE_TO_HOST 2

/* The functions of one opened CUDA runtime. */
typedef struct ck_cudart {
    void *handle; /* from dlopen; NULL when not open */
    ck_cuda_error (*malloc_host)(void **ptr, size_t size);
    ck_cuda_error (*free_host)(void *ptr);
    ck_cuda_error (*memcpy_async)(void *dst, const void *src, size_t count, int kind,
                                  ck_cuda_stream stream);
    ck_cuda_error (*stream_create)(ck_cuda_stream *stream);
    ck_cuda_error (*stream_synchronize)(ck_cuda_stream stream);
    ck_cuda_error (*stream_destroy)(ck_cuda_stream stream);
    ck_cuda_error (*get_last_error)(void);
    ck_cuda_error (*set_device)(int device);
    ck_cuda_error (*get_device)(int *device);
    const char *(*get_error_string)(ck_cuda_error error);
} ck_cudart;

/* Opens a CUDA runtime and resolves its functions. With path non-NULL,
 * exactly that library (CK_E_NOTFOUND if it cannot be opened, CK_E_FORMAT
 * if it lacks a function). With path NULL: the libcudart.so* already loaded
 * in this process (the one torch uses), else libcudart.so.12, .13, .11 by
 * soname; CK_E_NOTFOUND when there is none. Each successful open must be
 * paired with ck_cudart_close. */
ck_status ck_cudart_open(const char *path, ck_cudart *rt, ck_error *err);

/* Drops this reference to the library and zeroes rt. Safe on a zeroed rt. */
void ck_cudart_close(ck_cudart *rt);

/* One contiguous run of device memory to copy. */
typedef struct ck_devcopy_segment {
    uint64_t src;  /* device address */
    size_t nbytes; /* may be 0 */
    int device;    /* CUDA device index, >= 0 */
    size_t offset; /* set by ck_devcopy_plan: where the bytes land in the arena */
} ck_devcopy_segment;

/* Alignment of every segment in the arena: a cache line, and a multiple of
 * every element size, so a tensor of any dtype can start at any segment. */
#define CK_DEVCOPY_ALIGN 64

/* Lays the segments out in order, each at an offset that is a multiple of
 * align (a power of two), and sets *total to the arena size (the end of the
 * last segment). CK_E_LIMIT if the sum overflows size_t, CK_E_RANGE for a
 * negative device or an align that is not a power of two. */
ck_status ck_devcopy_plan(ck_devcopy_segment *segs, size_t n, size_t align, size_t *total,
                          ck_error *err);

/* Where the arena lives. Pinned memory (cudaMallocHost) takes the copies at
 * full bus speed but costs page locking when allocated; pageable memory
 * (a CK_DEVCOPY_ALIGN-aligned heap block) is cheap to allocate, and the
 * driver stages its copies through its own pinned buffers. */
typedef enum ck_devcopy_memory { CK_DEVCOPY_PINNED = 0, CK_DEVCOPY_PAGEABLE = 1 } ck_devcopy_memory;

/* Allocates an arena of total bytes (nothing, *arena = NULL, when total is
 * 0), copies every planned segment into it with one stream per device,
 * waits for all of them, and restores the calling thread's current device.
 * On failure nothing is left allocated (streams drained and destroyed, the
 * arena freed), the runtime's error state is cleared, and err names the
 * failing call and the runtime's message (CK_E_NOMEM when the allocation
 * fails, CK_E_IO otherwise with os_errno 0). Does not touch Python:
 * callers may release the GIL around it. */
ck_status ck_devcopy_run(const ck_cudart *rt, const ck_devcopy_segment *segs, size_t n,
                         size_t total, ck_devcopy_memory memory, void **arena, ck_error *err);

/* Copies every segment into an arena the caller owns (total bytes; each
 * segment's offset already set, e.g. by ck_devcopy_plan), with one stream
 * per device and one wait, restoring the calling thread's current device:
 * ck_devcopy_run without the allocation, for arenas reused across batches.
 * CK_E_RANGE for a segment outside the arena; on a runtime failure the
 * streams are drained (no copy is still writing) and err is set as for
 * ck_devcopy_run. Does not touch Python. */
ck_status ck_devcopy_into(const ck_cudart *rt, const ck_devcopy_segment *segs, size_t n,
                          void *arena, size_t total, ck_error *err);

/* Frees an arena from ck_devcopy_run (NULL is a no-op). */
void ck_devcopy_free(const ck_cudart *rt, void *arena, ck_devcopy_memory memory);

#endif
