#define CK_CURLSHIM_IMPL
#include "curlshim.h"
#include "dynlib.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int ck_curl_load(const char **why);

static CURLcode first_global_init(long flags);
static const char *missing_strerror(CURLcode code);

ck_curl_api ck_curl = {.global_init = first_global_init, .easy_strerror = missing_strerror};

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static const char *load_why = NULL;
static char described[256];
static const char *ca_bundle = NULL;
/* the real curl_easy_init, wrapped so that new handles get the CA bundle */
static CURL *(*real_easy_init)(void);

static const char *const CA_BUNDLES[] = {
    "/etc/ssl/certs/ca-certificates.crt",                /* Debian, Ubuntu, Arch, Gentoo */
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", /* Fedora, RHEL >= 7 */
    "/etc/pki/tls/certs/ca-bundle.crt",                  /* Fedora, RHEL, CentOS */
    "/etc/ssl/ca-bundle.pem",                            /* openSUSE */
    "/etc/ssl/cert.pem",                                 /* Alpine */
};

static const char *const MISSING =
    "libcurl could not be opened (tried libcurl.so.4 and libcurl-gnutls.so.4): downloads need "
    "the system's libcurl (Debian/Ubuntu: apt install libcurl4; Fedora/RHEL: dnf install "
    "libcurl), or CKPTIO_LIBCURL=/path/to/libcurl.so.4";

/* curl_global_init before libcurl is open: opens it, then calls its own */
static CURLcode first_global_init(long flags) {
    if (ck_curl_load(NULL) != 0)
        return CURLE_FAILED_INIT;
    return ck_curl.global_init(flags);
}

static const char *missing_strerror(CURLcode code) {
    (void)code;
    return load_why != NULL ? load_why : MISSING;
}

static int exists_under(const char *root, const char *path) {
    char full[4096];
    if (path == NULL || path[0] == 0)
        return 0;
    int n = snprintf(full, sizeof full, "%s%s", root, path);
    return n > 0 && (size_t)n < sizeof full && access(full, R_OK) == 0;
}

const char *ck_curl_pick_ca(const char *root, const char *cainfo, const char *capath) {
    if (exists_under(root, cainfo) || exists_under(root, capath))
        return NULL;
    for (size_t i = 0; i < sizeof CA_BUNDLES / sizeof CA_BUNDLES[0]; i++)
        if (exists_under(root, CA_BUNDLES[i]))
            return CA_BUNDLES[i];
    return NULL;
}

static CURL *easy_init_with_ca(void) {
    CURL *c = real_easy_init();
    if (c != NULL && ca_bundle != NULL)
        ck_curl.easy_setopt(c, CURLOPT_CAINFO, ca_bundle);
    return c;
}

/* Takes the libcurl at h (ck_dl_open_first) when it has what ckptio needs. */
static int accept_curl(void *h, const char *name) {
    ck_curl_api api;
    *(void **)&api.global_init = dlsym(h, "curl_global_init");
    *(void **)&api.easy_init = dlsym(h, "curl_easy_init");
    *(void **)&api.easy_setopt = dlsym(h, "curl_easy_setopt");
    *(void **)&api.easy_perform = dlsym(h, "curl_easy_perform");
    *(void **)&api.easy_getinfo = dlsym(h, "curl_easy_getinfo");
    *(void **)&api.easy_cleanup = dlsym(h, "curl_easy_cleanup");
    *(void **)&api.easy_strerror = dlsym(h, "curl_easy_strerror");
    *(void **)&api.slist_append = dlsym(h, "curl_slist_append");
    *(void **)&api.slist_free_all = dlsym(h, "curl_slist_free_all");
    *(void **)&api.version_info = dlsym(h, "curl_version_info");
    if (!api.global_init || !api.easy_init || !api.easy_setopt || !api.easy_perform ||
        !api.easy_getinfo || !api.easy_cleanup || !api.easy_strerror || !api.slist_append ||
        !api.slist_free_all || !api.version_info) {
        load_why = "the libcurl found lacks functions ckptio needs";
        return 0;
    }
    /* the options ckptio sets (CURLOPT_PROTOCOLS_STR) need 7.85 */
    curl_version_info_data *v = api.version_info(CURLVERSION_NOW);
    if (v == NULL || v->version_num < 0x075500) {
        load_why = "the system's libcurl is older than 7.85, which ckptio needs";
        return 0;
    }
    const char *cainfo = v->age >= CURLVERSION_NINTH ? v->cainfo : NULL;
    const char *capath = v->age >= CURLVERSION_NINTH ? v->capath : NULL;
    ca_bundle = ck_curl_pick_ca("", cainfo, capath);
    real_easy_init = api.easy_init;
    api.easy_init = easy_init_with_ca;
    snprintf(described, sizeof described, "%s %s%s%s", name, v->version, v->ssl_version ? " " : "",
             v->ssl_version ? v->ssl_version : "");
    ck_curl = api;
    load_why = NULL;
    return 1;
}

static void load(void) {
    /* CKPTIO_LIBCURL, when set, is the only file tried */
    static const char *const names[] = {"libcurl.so.4", "libcurl-gnutls.so.4"};
    int from_env = 0;
    if (ck_dl_open_first("CKPTIO_LIBCURL", names, sizeof names / sizeof names[0], accept_curl,
                         &from_env))
        return;
    if (load_why == NULL)
        load_why = from_env ? "libcurl could not be opened from CKPTIO_LIBCURL" : MISSING;
}

int ck_curl_load(const char **why) {
    pthread_once(&load_once, load);
    if (ck_curl.easy_init == NULL) {
        if (why != NULL)
            *why = load_why;
        return -1;
    }
    return 0;
}

const char *ck_curl_describe(void) {
    return ck_curl_load(NULL) == 0 ? described : NULL;
}

const char *ck_curl_ca_bundle(void) {
    return ck_curl_load(NULL) == 0 ? ca_bundle : NULL;
}
