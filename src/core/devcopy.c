#include "devcopy.h"

#include <dlfcn.h>
#include <link.h>
#include <stdlib.h>
#include <string.h>

/* ---- opening the runtime ---------------------------------------------------- */

#define CUDART_PATH_MAX 4096

/* dl_iterate_phdr callback: copies the path of the first loaded object whose
 * file name starts with "libcudart.so" into data (CUDART_PATH_MAX bytes). */
static int find_loaded_cudart(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    const char *name = info->dlpi_name;
    if (name == NULL || name[0] == '\0')
        return 0;
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    if (strncmp(base, "libcudart.so", 12) != 0 || strlen(name) >= CUDART_PATH_MAX)
        return 0;
    memcpy(data, name, strlen(name) + 1);
    return 1;
}

static void *open_default(void) {
    char loaded[CUDART_PATH_MAX] = "";
    if (dl_iterate_phdr(find_loaded_cudart, loaded) != 0) {
        /* already mapped: RTLD_NOLOAD takes a reference without loading */
        void *h = dlopen(loaded, RTLD_NOW | RTLD_NOLOAD);
        if (h != NULL)
            return h;
    }
    static const char *const sonames[] = {"libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0",
                                          "libcudart.so"};
    for (size_t i = 0; i < sizeof sonames / sizeof sonames[0]; i++) {
        void *h = dlopen(sonames[i], RTLD_NOW | RTLD_LOCAL);
        if (h != NULL)
            return h;
    }
    return NULL;
}

ck_status ck_cudart_open(const char *path, ck_cudart *rt, ck_error *err) {
    memset(rt, 0, sizeof *rt);
    void *h = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : open_default();
    if (h == NULL) {
        if (path)
            return ck_fail(err, CK_E_NOTFOUND, "cannot open the CUDA runtime %s: %s", path,
                           dlerror());
        return ck_fail(err, CK_E_NOTFOUND, "no CUDA runtime (libcudart.so) found");
    }
    static const struct {
        const char *name;
        size_t offset;
    } symbols[] = {
#define S(n, f) {n, offsetof(ck_cudart, f)}
        S("cudaMallocHost", malloc_host),
        S("cudaFreeHost", free_host),
        S("cudaMemcpyAsync", memcpy_async),
        S("cudaStreamCreate", stream_create),
        S("cudaStreamSynchronize", stream_synchronize),
        S("cudaStreamDestroy", stream_destroy),
        S("cudaGetLastError", get_last_error),
        S("cudaSetDevice", set_device),
        S("cudaGetDevice", get_device),
        S("cudaGetErrorString", get_error_string),
#undef S
    };
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++) {
        void *fn = dlsym(h, symbols[i].name);
        if (fn == NULL) {
            dlclose(h);
            memset(rt, 0, sizeof *rt);
            return ck_fail(err, CK_E_FORMAT, "the CUDA runtime %s has no %s",
                           path ? path : "libcudart.so", symbols[i].name);
        }
        /* POSIX guarantees that a data pointer from dlsym converts to a
         * function pointer; memcpy says so without a cast warning. */
        memcpy((char *)rt + symbols[i].offset, &fn, sizeof fn);
    }
    rt->handle = h;
    return CK_OK;
}

void ck_cudart_close(ck_cudart *rt) {
    if (rt->handle != NULL)
        dlclose(rt->handle);
    memset(rt, 0, sizeof *rt);
}

/* ---- the batch ----------------------------------------------------------------- */

ck_status ck_devcopy_plan(ck_devcopy_segment *segs, size_t n, size_t align, size_t *total,
                          ck_error *err) {
    *total = 0;
    if (align == 0 || (align & (align - 1)) != 0)
        return ck_fail(err, CK_E_RANGE, "alignment %zu is not a power of two", align);
    size_t end = 0;
    for (size_t i = 0; i < n; i++) {
        if (segs[i].device < 0)
            return ck_fail(err, CK_E_RANGE, "segment %zu: device %d is negative", i,
                           segs[i].device);
        if (end > SIZE_MAX - (align - 1))
            return ck_fail(err, CK_E_LIMIT, "segment %zu: the arena size overflows", i);
        size_t start = (end + align - 1) & ~(align - 1);
        if (segs[i].nbytes > SIZE_MAX - start)
            return ck_fail(err, CK_E_LIMIT, "segment %zu: the arena size overflows", i);
        segs[i].offset = start;
        end = start + segs[i].nbytes;
    }
    *total = end;
    return CK_OK;
}

/* Records a failed runtime call in err and clears the runtime's error. */
static ck_status cuda_fail(const ck_cudart *rt, ck_error *err, ck_status status, const char *call,
                           ck_cuda_error code) {
    const char *text = rt->get_error_string(code);
    ck_fail(err, status, "%s failed: %s (CUDA error %d)", call, text ? text : "unknown error",
            code);
    rt->get_last_error();
    return status;
}

typedef struct device_stream {
    int device;
    ck_cuda_stream stream;
} device_stream;

/* Waits for and destroys the first count streams. Returns the first failing
 * synchronisation's code (0 when all succeeded). */
static ck_cuda_error drain_streams(const ck_cudart *rt, device_stream *ds, size_t count,
                                   const char **call) {
    ck_cuda_error first = 0;
    for (size_t i = 0; i < count; i++) {
        ck_cuda_error e = rt->set_device(ds[i].device);
        if (e == 0)
            e = rt->stream_synchronize(ds[i].stream);
        if (e != 0 && first == 0) {
            first = e;
            *call = "cudaStreamSynchronize";
        }
        e = rt->stream_destroy(ds[i].stream);
        if (e != 0 && first == 0) {
            first = e;
            *call = "cudaStreamDestroy";
        }
    }
    return first;
}

void ck_devcopy_free(const ck_cudart *rt, void *arena, ck_devcopy_memory memory) {
    if (arena == NULL)
        return;
    if (memory == CK_DEVCOPY_PINNED)
        rt->free_host(arena);
    else
        free(arena);
}

/* Allocates the arena; 0 or the runtime's error (-1: the heap failed). */
static ck_cuda_error arena_alloc(const ck_cudart *rt, size_t total, ck_devcopy_memory memory,
                                 void **host) {
    *host = NULL;
    if (memory == CK_DEVCOPY_PINNED) {
        ck_cuda_error e = rt->malloc_host(host, total);
        return e != 0 ? e : (*host == NULL ? -1 : 0);
    }
    if (total > SIZE_MAX - (CK_DEVCOPY_ALIGN - 1))
        return -1;
    *host = aligned_alloc(CK_DEVCOPY_ALIGN,
                          (total + CK_DEVCOPY_ALIGN - 1) & ~(size_t)(CK_DEVCOPY_ALIGN - 1));
    return *host == NULL ? -1 : 0;
}

/* Issues every segment's copy into host (one stream per distinct device,
 * in order of first appearance) and waits for all of them. Returns 0, or the
 * failing call's code with *call naming it. The current device is left
 * changed; the caller restores it. */
static ck_cuda_error copy_segments(const ck_cudart *rt, const ck_devcopy_segment *segs, size_t n,
                                   void *host, const char **call) {
    device_stream *ds = calloc(n ? n : 1, sizeof *ds);
    if (ds == NULL) {
        *call = "calloc";
        return -1;
    }
    size_t nds = 0;
    ck_cuda_error e = 0;
    for (size_t i = 0; i < n && e == 0; i++) {
        int seen = 0;
        for (size_t k = 0; k < nds && !seen; k++)
            seen = ds[k].device == segs[i].device;
        if (seen)
            continue;
        *call = "cudaSetDevice";
        e = rt->set_device(segs[i].device);
        if (e == 0) {
            *call = "cudaStreamCreate";
            e = rt->stream_create(&ds[nds].stream);
        }
        if (e == 0)
            ds[nds++].device = segs[i].device;
    }
    for (size_t k = 0; k < nds && e == 0; k++) {
        *call = "cudaSetDevice";
        e = rt->set_device(ds[k].device);
        for (size_t i = 0; i < n && e == 0; i++) {
            if (segs[i].device != ds[k].device || segs[i].nbytes == 0)
                continue;
            *call = "cudaMemcpyAsync";
            e = rt->memcpy_async((char *)host + segs[i].offset,
                                 (const void *)(uintptr_t)segs[i].src, segs[i].nbytes,
                                 CK_CUDA_MEMCPY_DEVICE_TO_HOST, ds[k].stream);
        }
    }
    /* Copies already issued write into the arena: drain before returning. */
    const char *drain_call = NULL;
    ck_cuda_error drained = drain_streams(rt, ds, nds, &drain_call);
    free(ds);
    if (e == 0 && drained != 0) {
        e = drained;
        *call = drain_call;
    }
    return e;
}

static ck_status check_segments(const ck_devcopy_segment *segs, size_t n, size_t total,
                                ck_error *err) {
    for (size_t i = 0; i < n; i++)
        if (segs[i].offset > total || segs[i].nbytes > total - segs[i].offset)
            return ck_fail(err, CK_E_RANGE, "segment %zu lies outside the arena", i);
    return CK_OK;
}

/* The copies of ck_devcopy_into, once the device to restore is known. */
static ck_status copy_and_restore(const ck_cudart *rt, const ck_devcopy_segment *segs, size_t n,
                                  void *arena, int saved_device, ck_error *err) {
    const char *call = NULL;
    ck_cuda_error e = copy_segments(rt, segs, n, arena, &call);
    if (e == -1) {
        rt->set_device(saved_device);
        return ck_fail(err, CK_E_NOMEM, "out of memory for %zu streams", n);
    }
    if (e != 0) {
        cuda_fail(rt, err, CK_E_IO, call, e);
        rt->set_device(saved_device);
        rt->get_last_error();
        return CK_E_IO;
    }
    e = rt->set_device(saved_device);
    if (e != 0)
        return cuda_fail(rt, err, CK_E_IO, "cudaSetDevice", e);
    return CK_OK;
}

ck_status ck_devcopy_into(const ck_cudart *rt, const ck_devcopy_segment *segs, size_t n,
                          void *arena, size_t total, ck_error *err) {
    if (check_segments(segs, n, total, err) != CK_OK)
        return CK_E_RANGE;
    if (n == 0)
        return CK_OK;
    int saved_device = 0;
    ck_cuda_error e = rt->get_device(&saved_device);
    if (e != 0)
        return cuda_fail(rt, err, CK_E_IO, "cudaGetDevice", e);
    return copy_and_restore(rt, segs, n, arena, saved_device, err);
}

ck_status ck_devcopy_run(const ck_cudart *rt, const ck_devcopy_segment *segs, size_t n,
                         size_t total, ck_devcopy_memory memory, void **arena, ck_error *err) {
    *arena = NULL;
    if (total == 0)
        return CK_OK;
    if (check_segments(segs, n, total, err) != CK_OK)
        return CK_E_RANGE;
    /* a runtime that cannot work (no GPU, old driver) fails here, before
     * anything is allocated */
    int saved_device = 0;
    ck_cuda_error e = rt->get_device(&saved_device);
    if (e != 0)
        return cuda_fail(rt, err, CK_E_IO, "cudaGetDevice", e);
    void *host = NULL;
    e = arena_alloc(rt, total, memory, &host);
    if (e == -1) {
        rt->set_device(saved_device);
        return ck_fail(err, CK_E_NOMEM, "out of memory for a %s arena of %zu bytes",
                       memory == CK_DEVCOPY_PINNED ? "pinned" : "pageable", total);
    }
    if (e != 0) {
        cuda_fail(rt, err, CK_E_NOMEM, "cudaMallocHost", e);
        rt->set_device(saved_device);
        return CK_E_NOMEM;
    }
    ck_status status = copy_and_restore(rt, segs, n, host, saved_device, err);
    if (status != CK_OK) {
        ck_devcopy_free(rt, host, memory);
        return status;
    }
    *arena = host;
    return CK_OK;
}
