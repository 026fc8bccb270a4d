/* libFuzzer harness for the zip locator (src/core/zipread.c): every input is
 * opened as an archive; when it opens, every entry is looked up by name,
 * its stored bytes read, its CRC checked, and it is extracted (with a 1 MiB
 * limit, so that a bomb is refused before it is inflated). The same bytes
 * are then opened from a file (a memfd) with ck_zip_open_file, the pread
 * reader, which must give the same status, message and records.
 *
 * Built with -fsanitize=fuzzer (make fuzz) it is a fuzzer; built with
 * -DCK_FUZZ_REPLAY (make fuzz-replay) its main() replays the files and
 * folders given as arguments. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/zipread.h"
#include "replay.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return 0;
}

/* The pread reader on a file holding the same bytes agrees with the buffer
 * reader (status rc, message msg, the records of zip when it opened). */
static void check_file_reader(const uint8_t *data, size_t size, ck_status rc, const char *msg,
                              const ck_zip *zip) {
    int fd = memfd_create("fuzz_zip", MFD_CLOEXEC);
    if (fd < 0)
        return;
    if (size > 0 && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return;
    }
    ck_zip fz;
    ck_error ferr;
    ck_error_clear(&ferr);
    ck_status frc = ck_zip_open_file(&fz, data, size, fd, 0, &ferr);
    if (frc != rc || (rc != CK_OK && strcmp(ferr.msg, msg) != 0))
        abort();
    if (rc == CK_OK) {
        if (fz.n_entries != zip->n_entries)
            abort();
        for (size_t i = 0; i < fz.n_entries; i++) {
            const ck_zip_entry *a = &zip->entries[i], *b = &fz.entries[i];
            if (a->data_offset != b->data_offset || a->name_len != b->name_len ||
                memcmp(a->name, b->name, a->name_len) != 0 || a->size != b->size)
                abort();
            uint8_t *out = NULL;
            size_t out_len = 0;
            if (b->method == CK_ZIP_METHOD_STORED && b->size <= (1 << 20) &&
                ck_zip_read_stored(&fz, i, &out, &out_len, &ferr) == CK_OK) {
                if (out_len != b->size || (out_len && memcmp(out, data + b->data_offset, out_len)))
                    abort();
                free(out);
            }
        }
    }
    ck_zip_close(&fz);
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ck_zip zip;
    ck_error err;
    ck_error_clear(&err);
    ck_status rc = ck_zip_open(&zip, data, size, &err);
    check_file_reader(data, size, rc, err.msg, &zip);
    if (rc != CK_OK) {
        if (err.msg[0] == 0 || err.status == CK_OK)
            abort(); /* a failure must always say why */
        return 0;
    }
    if (zip.n_entries == 0 || zip.prefix_len == 0)
        abort();
    for (size_t i = 0; i < zip.n_entries; i++) {
        const ck_zip_entry *e = &zip.entries[i];
        if (e->data_offset + e->comp_size > zip.cd_offset || e->name_len <= zip.prefix_len)
            abort(); /* open promised every entry lies inside the data area */
        const char *rel = e->name + zip.prefix_len + 1;
        size_t rel_len = e->name_len - zip.prefix_len - 1;
        if (ck_zip_find(&zip, rel, rel_len) != (ptrdiff_t)i)
            abort(); /* names are unique: the index finds each entry at its place */
        const uint8_t *stored = ck_zip_stored_data(&zip, i);
        if (stored != NULL) {
            volatile uint8_t sink = 0;
            for (uint64_t k = 0; k < e->size; k += 4096)
                sink ^= stored[k];
            (void)sink;
        }
        (void)ck_zip_check_crc(&zip, i, (int)(i & 1), &err);
        uint8_t *out = NULL;
        size_t out_len = 0;
        if (ck_zip_extract(&zip, i, 1 << 20, &out, &out_len, &err) == CK_OK) {
            if (out_len != e->size)
                abort();
            free(out);
        } else if (out != NULL || out_len != 0) {
            abort();
        }
    }
    ck_zip_close(&zip);
    return 0;
}
