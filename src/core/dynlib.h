/* Opening a shared library at run time (libcurl, libcrypto): the first of
 * a list of file names, or the one an environment variable names. */
#ifndef CKPTIO_CORE_DYNLIB_H
#define CKPTIO_CORE_DYNLIB_H

#include <stddef.h>

/* Takes (returns 1: the library stays open for the life of the process) or
 * refuses (0) the library just opened from the file `name`. */
typedef int (*ck_dl_accept)(void *handle, const char *name);

/* Opens the files `names` (n of them) in order, or only the one the
 * environment variable env names when it is set and not empty, until
 * `accept` takes one: returns 1 then, else 0 (each library refused is
 * closed). *from_env (when not NULL) says whether env named the file. */
int ck_dl_open_first(const char *env, const char *const *names, size_t n, ck_dl_accept accept,
                     int *from_env);

#endif
