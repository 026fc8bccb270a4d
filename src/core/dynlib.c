#include "dynlib.h"

#include <dlfcn.h>
#include <stdlib.h>

int ck_dl_open_first(const char *env, const char *const *names, size_t n, ck_dl_accept accept,
                     int *from_env) {
    const char *chosen = getenv(env);
    int by_env = chosen != NULL && chosen[0] != 0;
    if (from_env != NULL)
        *from_env = by_env;
    if (by_env)
        names = &chosen, n = 1;
    for (size_t i = 0; i < n; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (h == NULL)
            continue;
        if (accept(h, names[i]))
            return 1;
        dlclose(h);
    }
    return 0;
}
