/* One load: the bytes, the container's record table, the storages met so
 * far, and the options. Lives on the C stack of ck_py_load for the length
 * of the call; nothing outside the call keeps a pointer to it. */
#ifndef CKPTIO_BINDING_SESSION_H
#define CKPTIO_BINDING_SESSION_H

#include "state.h"
#include "core/zipread.h"

/* Containers the pickle builds nest at most this deep (the depth of an
 * object is counted as the machine builds it: one more than its deepest
 * item). CPython hashes and compares nested tuples by recursion in C (a
 * tuple 10^6 deep crashes torch.load in tuple hash); CPython 3.13 takes
 * 10,000 levels of C recursion as safe, and pickle's writer stops there too. */
#define CK_MAX_DEPTH 10000

/* How map_location is applied to a storage saved at `location`. */
typedef enum ck_map_kind {
    CK_MAP_NONE, /* map_location=None: 'cpu' stays, others via restore() */
    CK_MAP_CPU,  /* every storage to the CPU: nothing to call */
    CK_MAP_DICT, /* location = map_location.get(location, location), then as NONE */
    CK_MAP_CALL  /* always restore(storage, location) */
} ck_map_kind;

/* Where a storage's bytes stand once placed. */
typedef enum ck_place {
    CK_PLACE_UNSET = 0,
    CK_PLACE_CPU,  /* bytes at ptr (owned by owner): NumPy arrays over them */
    CK_PLACE_OTHER /* restore() gave `ustorage` (any device) */
} ck_place;

typedef struct ck_storage {
    int used;             /* a persistent id named it */
    const uint8_t *src;   /* its bytes in the file (NULL: a compressed zip entry) */
    uint64_t src_size;    /* bytes available at src (or the entry's inflated size) */
    ptrdiff_t zip_index;  /* the zip entry, to inflate when src is NULL; else -1 */
    ptrdiff_t view_of;    /* legacy views: the root storage's slot; else -1 */
    uint64_t view_offset; /* legacy views: byte offset into the root */
    int dtype;            /* ck_dtype_code of the first persistent id naming it */
    int untyped;          /* saved as UntypedStorage (bytes): never byte-swapped */
    uint64_t nbytes;      /* from the first persistent id */
    uint8_t *ptr;         /* its bytes once placed on the CPU */
    PyObject *owner;      /* strong: owner of ptr's memory (Mapping) */
    PyObject *location;   /* strong: the saved location tag (str) */
    PyObject *first;      /* strong: a tensor built directly over the whole storage */
    PyObject *ustorage;   /* strong: its UntypedStorage, once needed */
    PyObject *typed;      /* strong: the TypedStorage handed to Python code, once needed */
    PyObject *ref;        /* strong: the StorageRef pushed by persistent loads */
    ck_place place;
} ck_storage;

typedef struct ck_session {
    ck_state *st;
    PyObject *filename; /* str, for messages */
    PyObject *owner;    /* the Mapping owning buf */
    const uint8_t *buf;
    size_t len;
    int fd;           /* the file buf maps, open for pread of headers and small records; or -1 */
    uint64_t fd_base; /* the file offset of buf[0] (a DCP item is a range of its file) */
    ck_zip zip;       /* zip archives */
    int is_zip;
    PyObject *legacy_slots; /* legacy stream: dict storage key -> slot */
    ck_storage *storages;   /* zip: one per entry (indexed like zip.entries);
                               legacy: one per storage key */
    size_t n_storages;

    /* options */
    int weights_only;
    int warn_protocol;  /* weights_only, and this torch's unpickler warns of protocols != 2 */
    int allow;          /* CK_ALLOW_* bits (dataset.h): data sets beyond torch's allowlist */
    PyObject *encoding; /* str; NULL means 'bytes' (keep bytes) */
    PyObject *errors;   /* str */
    ck_map_kind map_kind;
    PyObject *map_location;     /* borrowed: the dict for CK_MAP_DICT */
    PyObject *restore;          /* borrowed: restore_location(storage, location) */
    PyObject *user_globals;     /* borrowed dict "module.name" -> object, or NULL */
    PyObject *user_ids;         /* strong set of id() of user_globals values */
    int byteswap;               /* stored byte order differs from the host's */
    int unaligned_ok;           /* storages may stay unaligned in place (their tensors are only
                                   read by copying: DCP items); else misaligned bytes are copied */
    uint64_t inflate_budget;    /* bytes compressed records may still inflate to */
    uint64_t budget_total;      /* the memory bound of this load (budget.c) */
    uint64_t budget_left;       /* what is left of it */
    Py_ssize_t collidable_keys; /* dict keys / set items a file can make collide (budget.h) */

    int pickle_proto; /* the last pickle run's PROTO opcode argument, -1 if it had none
                         (unpickler.c; read with ck_unpickle_protocol) */

    /* the plain twins of RefTuples met so far: id -> (reftuple, twin) (materialize.c) */
    PyObject *twins;
} ck_session;

/* Starts a session over the bytes of mapping (a ckptio._native.Mapping,
 * checked by the caller): every field zeroed, then st, filename and owner
 * set (borrowed: the caller holds them for the call) and buf/len (and the
 * mapped file's descriptor, while the mapping holds one) taken from the
 * mapping's region. Options are the caller's to set. */
void ck_session_begin(ck_session *s, ck_state *st, PyObject *filename, PyObject *mapping);

/* Releases what the session came to own: its storages, the zip index, the
 * user-global ids, the legacy slot table, encoding and errors. Safe on a
 * session that failed part way. */
void ck_session_end(ck_session *s);

#endif
