/* libFuzzer harness driven by a generator: each input's bytes choose a
 * torch-shaped file in the space of tests/torchspace.py (read from the
 * installed torch: every allowlisted rebuild function, storage type and
 * dtype), with the tensors' geometry near the edges, storages shared
 * between tensors, memoized objects reused, long legacy view chains, many
 * extra records and bytes of the input's own spliced into the pickle (see
 * torchspace.from_bytes). The file goes to ckptio.load and ckptio.verify
 * through the embedded interpreter (pyembed.h): so every mutation is a
 * well-formed file reaching the tensor machinery, where byte-level fuzzing
 * of whole files mostly stops at CRCs and zip checks. The same space is
 * tested exhaustively against torch.load by tests/test_rebuild_table.py.
 * Built with -DCK_FUZZ_REPLAY, main() replays files. */
#define CK_FUZZ_VERIFY 1
#define CK_FUZZ_PLAIN_INIT 1
#define CK_FUZZ_TRANSFORM "torchspace.from_bytes"
#include "pyembed.h"
#include "replay.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > (1 << 16))
        return 0;
    ck_fuzz_python_load(data, size);
    return 0;
}
