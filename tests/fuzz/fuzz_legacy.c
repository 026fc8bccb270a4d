/* libFuzzer harness for ckptio.load and ckptio.verify on whole files, seeded
 * with the legacy format (torch.save(..., _use_new_zipfile_serialization=
 * False)): the header pickles, the storage scan, the key list, the raw
 * storage data and the object pickle with views; run on the zip corpus too,
 * it reaches verify's record, CRC and storage checks. The embedded interpreter imports the
 * ckptio._native that the Makefile built with coverage and AddressSanitizer
 * (see pyembed.h); built with -DCK_FUZZ_REPLAY, main() replays files. */
#define CK_FUZZ_VERIFY 1
#include "pyembed.h"
#include "replay.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    ck_fuzz_python_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ck_fuzz_python_load(data, size);
    return 0;
}
