/* libFuzzer harness for the zip locator (src/core/zipread.c): every input is
 * opened as an archive; when it opens, every entry is looked up by name,
 * its stored bytes read, its CRC checked, and it is extracted (with a 1 MiB
 * limit, so that a bomb is refused before it is inflated).
 *
 * Built with -fsanitize=fuzzer (make fuzz) it is a fuzzer; built with
 * -DCK_FUZZ_REPLAY (make fuzz-replay) its main() replays the files and
 * folders given as arguments. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/zipread.h"
#include "replay.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ck_zip zip;
    ck_error err;
    ck_error_clear(&err);
    if (ck_zip_open(&zip, data, size, &err) != CK_OK) {
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
