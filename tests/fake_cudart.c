/* A stand-in for libcudart.so, for tests on machines without CUDA: "device
 * pointers" are host addresses, copies are memcpy, pinned memory is
 * aligned_alloc. Every call is counted in fake_calls, and a test makes a
 * call fail by setting fake_fail_<call> to the 1-based number of the call
 * that should fail (0: none). Read and set through ctypes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
    F_MALLOC_HOST,
    F_FREE_HOST,
    F_MEMCPY_ASYNC,
    F_STREAM_CREATE,
    F_STREAM_SYNCHRONIZE,
    F_STREAM_DESTROY,
    F_GET_LAST_ERROR,
    F_SET_DEVICE,
    F_GET_DEVICE,
    F_COUNT
};

long fake_calls[F_COUNT];
long fake_fail_memcpy_async;
long fake_fail_malloc_host;
long fake_fail_stream_synchronize;
long fake_live_host_bytes; /* pinned bytes allocated and not yet freed */
long fake_bad_stream_use;  /* copies issued on a stream of another device */
int fake_current_device;
int fake_last_error;

enum { SUCCESS = 0, INVALID_VALUE = 1, MEMORY_ALLOCATION = 2, INVALID_DEVICE = 101 };

typedef struct stream {
    int device;
    long pending;
} stream;

static int fail(int code) {
    fake_last_error = code;
    return code;
}

int cudaMallocHost(void **ptr, size_t size) {
    long n = ++fake_calls[F_MALLOC_HOST];
    if (n == fake_fail_malloc_host)
        return fail(MEMORY_ALLOCATION);
    size_t rounded = (size + 255) & ~(size_t)255;
    size_t *block = aligned_alloc(256, rounded + 256);
    if (block == NULL)
        return fail(MEMORY_ALLOCATION);
    block[0] = size;
    fake_live_host_bytes += (long)size;
    *ptr = (char *)block + 256;
    return SUCCESS;
}

int cudaFreeHost(void *ptr) {
    fake_calls[F_FREE_HOST]++;
    if (ptr == NULL)
        return SUCCESS;
    size_t *block = (size_t *)((char *)ptr - 256);
    fake_live_host_bytes -= (long)block[0];
    free(block);
    return SUCCESS;
}

int cudaMemcpyAsync(void *dst, const void *src, size_t count, int kind, void *s) {
    long n = ++fake_calls[F_MEMCPY_ASYNC];
    if (n == fake_fail_memcpy_async || kind != 2 || s == NULL)
        return fail(INVALID_VALUE);
    stream *st = s;
    if (st->device != fake_current_device)
        fake_bad_stream_use++;
    memcpy(dst, src, count);
    st->pending++;
    return SUCCESS;
}

int cudaStreamCreate(void **s) {
    fake_calls[F_STREAM_CREATE]++;
    stream *st = calloc(1, sizeof *st);
    if (st == NULL)
        return fail(MEMORY_ALLOCATION);
    st->device = fake_current_device;
    *s = st;
    return SUCCESS;
}

int cudaStreamSynchronize(void *s) {
    long n = ++fake_calls[F_STREAM_SYNCHRONIZE];
    if (n == fake_fail_stream_synchronize)
        return fail(INVALID_VALUE);
    ((stream *)s)->pending = 0;
    return SUCCESS;
}

int cudaStreamDestroy(void *s) {
    fake_calls[F_STREAM_DESTROY]++;
    free(s);
    return SUCCESS;
}

int cudaGetLastError(void) {
    fake_calls[F_GET_LAST_ERROR]++;
    int e = fake_last_error;
    fake_last_error = SUCCESS;
    return e;
}

int cudaSetDevice(int device) {
    fake_calls[F_SET_DEVICE]++;
    if (device < 0 || device > 7)
        return fail(INVALID_DEVICE);
    fake_current_device = device;
    return SUCCESS;
}

int cudaGetDevice(int *device) {
    fake_calls[F_GET_DEVICE]++;
    *device = fake_current_device;
    return SUCCESS;
}

const char *cudaGetErrorString(int error) {
    switch (error) {
    case SUCCESS:
        return "no error";
    case INVALID_VALUE:
        return "invalid argument";
    case MEMORY_ALLOCATION:
        return "out of memory";
    case INVALID_DEVICE:
        return "invalid device ordinal";
    default:
        return "unrecognized error code";
    }
}
