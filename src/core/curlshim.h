/* libcurl, opened at run time instead of linked.
 *
 * http.c includes this header instead of <curl/curl.h> and calls libcurl's
 * functions by their own names; those names are macros for the entries of
 * ck_curl, filled by dlopen of the system's libcurl (libcurl.so.4, then
 * Debian's libcurl-gnutls.so.4; CKPTIO_LIBCURL names the one file to try). So the
 * extension has no link-time dependency on libcurl and its TLS stack: a
 * wheel runs where libcurl is absent (downloads then fail with a clear
 * message, or ckptio._hub falls back to torch.hub) and, where it is there,
 * uses the system's own libcurl with the system's TLS library and CA store.
 *
 * Building needs libcurl's headers only (types and constants).
 *
 * CA certificates: a handle made by curl_easy_init here trusts libcurl's
 * built-in CA bundle or directory when that exists on this machine; when it
 * does not (a libcurl built for another layout), the first bundle found of
 * the Debian/Ubuntu, Fedora/RHEL, openSUSE and Alpine locations is set as
 * CURLOPT_CAINFO. The caller's own CURLOPT_CAINFO/CAPATH (SSL_CERT_FILE...)
 * set afterwards take precedence.
 */
#ifndef CKPTIO_CORE_CURLSHIM_H
#define CKPTIO_CORE_CURLSHIM_H

#include <stddef.h>

#define CURL_DISABLE_TYPECHECK /* the type-checking macros would call the real symbols */
#include <curl/curl.h>

typedef struct ck_curl_api {
    CURLcode (*global_init)(long flags);
    CURL *(*easy_init)(void);
    CURLcode (*easy_setopt)(CURL *curl, CURLoption option, ...);
    CURLcode (*easy_perform)(CURL *curl);
    CURLcode (*easy_getinfo)(CURL *curl, CURLINFO info, ...);
    void (*easy_cleanup)(CURL *curl);
    const char *(*easy_strerror)(CURLcode code);
    struct curl_slist *(*slist_append)(struct curl_slist *list, const char *s);
    void (*slist_free_all)(struct curl_slist *list);
    curl_version_info_data *(*version_info)(CURLversion age);
} ck_curl_api;

/* The entry points http.c calls. Until libcurl is open, global_init opens
 * it (returning CURLE_FAILED_INIT when it cannot) and easy_strerror says
 * why it is missing; the others are called only after global_init
 * succeeded (ck_http_global_init sees to that). */
extern ck_curl_api ck_curl;

/* Opens libcurl once per process (thread-safe). Returns 0, or -1 with
 * *why (static text) saying what was tried. */
int ck_curl_load(const char **why);

/* The file opened and libcurl's version ("libcurl.so.4 8.5.0 OpenSSL/3.0.2"),
 * or NULL when libcurl could not be opened. */
const char *ck_curl_describe(void);

/* The CA bundle a new handle is given (NULL: libcurl's own default is used). */
const char *ck_curl_ca_bundle(void);

/* Picks the CA bundle for a libcurl whose built-in defaults are cainfo and
 * capath (either may be NULL): NULL when one of them exists under root (""
 * for the real root), else the first existing of the known locations (the
 * path without root), else NULL. Exposed for the tests. */
const char *ck_curl_pick_ca(const char *root, const char *cainfo, const char *capath);

#ifndef CK_CURLSHIM_IMPL
#undef curl_easy_setopt /* curl.h's three-argument check macros */
#undef curl_easy_getinfo
#define curl_global_init ck_curl.global_init
#define curl_easy_init ck_curl.easy_init
#define curl_easy_setopt ck_curl.easy_setopt
#define curl_easy_perform ck_curl.easy_perform
#define curl_easy_getinfo ck_curl.easy_getinfo
#define curl_easy_cleanup ck_curl.easy_cleanup
#define curl_easy_strerror ck_curl.easy_strerror
#define curl_slist_append ck_curl.slist_append
#define curl_slist_free_all ck_curl.slist_free_all
#define curl_version_info ck_curl.version_info
#endif

#endif
