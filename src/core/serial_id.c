#include "serial_id.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NIL SIZE_MAX
#define BEFORE_BEGIN (SIZE_MAX - 1)

/* libstdc++'s std::__detail::__prime_list entries below 2^32: a zip with a
 * 32-bit entry count never needs more buckets than the last one. */
static const uint32_t primes[] = {
    2u,          3u,          5u,          7u,          11u,         13u,         17u,
    19u,         23u,         29u,         31u,         37u,         41u,         43u,
    47u,         53u,         59u,         61u,         67u,         71u,         73u,
    79u,         83u,         89u,         97u,         103u,        109u,        113u,
    127u,        137u,        139u,        149u,        157u,        167u,        179u,
    193u,        199u,        211u,        227u,        241u,        257u,        277u,
    293u,        313u,        337u,        359u,        383u,        409u,        439u,
    467u,        503u,        541u,        577u,        619u,        661u,        709u,
    761u,        823u,        887u,        953u,        1031u,       1109u,       1193u,
    1289u,       1381u,       1493u,       1613u,       1741u,       1879u,       2029u,
    2179u,       2357u,       2549u,       2753u,       2971u,       3209u,       3469u,
    3739u,       4027u,       4349u,       4703u,       5087u,       5503u,       5953u,
    6427u,       6949u,       7517u,       8123u,       8783u,       9497u,       10273u,
    11113u,      12011u,      12983u,      14033u,      15173u,      16411u,      17749u,
    19183u,      20753u,      22447u,      24281u,      26267u,      28411u,      30727u,
    33223u,      35933u,      38873u,      42043u,      45481u,      49201u,      53201u,
    57557u,      62233u,      67307u,      72817u,      78779u,      85229u,      92203u,
    99733u,      107897u,     116731u,     126271u,     136607u,     147793u,     159871u,
    172933u,     187091u,     202409u,     218971u,     236897u,     256279u,     277261u,
    299951u,     324503u,     351061u,     379787u,     410857u,     444487u,     480881u,
    520241u,     562841u,     608903u,     658753u,     712697u,     771049u,     834181u,
    902483u,     976369u,     1056323u,    1142821u,    1236397u,    1337629u,    1447153u,
    1565659u,    1693859u,    1832561u,    1982627u,    2144977u,    2320627u,    2510653u,
    2716249u,    2938679u,    3179303u,    3439651u,    3721303u,    4026031u,    4355707u,
    4712381u,    5098259u,    5515729u,    5967347u,    6456007u,    6984629u,    7556579u,
    8175383u,    8844859u,    9569143u,    10352717u,   11200489u,   12117689u,   13109983u,
    14183539u,   15345007u,   16601593u,   17961079u,   19431899u,   21023161u,   22744717u,
    24607243u,   26622317u,   28802401u,   31160981u,   33712729u,   36473443u,   39460231u,
    42691603u,   46187573u,   49969847u,   54061849u,   58488943u,   63278561u,   68460391u,
    74066549u,   80131819u,   86693767u,   93793069u,   101473717u,  109783337u,  118773397u,
    128499677u,  139022417u,  150406843u,  162723577u,  176048909u,  190465427u,  206062531u,
    222936881u,  241193053u,  260944219u,  282312799u,  305431229u,  330442829u,  357502601u,
    386778277u,  418451333u,  452718089u,  489790921u,  529899637u,  573292817u,  620239453u,
    671030513u,  725980837u,  785430967u,  849749479u,  919334987u,  994618837u,  1076067617u,
    1164186217u, 1259520799u, 1362662261u, 1474249943u, 1594975441u, 1725587117u, 1866894511u,
    2019773507u, 2185171673u, 2364114217u, 2557710269u, 2767159799u, 2993761039u, 3238918481u,
    3504151727u, 3791104843u, 4101556399u, 4294967291u,
};
#define N_PRIMES (sizeof primes / sizeof primes[0])

/* The bucket counts libstdc++ picks for small requests. */
static const uint8_t fast_buckets[14] = {2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13};

static uint64_t shift_mix(uint64_t v) {
    return v ^ (v >> 47);
}

/* libstdc++'s _Hash_bytes (a MurmurHash2 variant) with std::hash's seed. */
uint64_t ck_std_string_hash(const void *data, size_t len) {
    const uint64_t mul = ((uint64_t)0xc6a4a793u << 32) + 0x5bd1e995u;
    const unsigned char *p = data;
    size_t aligned = len & ~(size_t)7;
    uint64_t h = (uint64_t)0xc70f6907u ^ ((uint64_t)len * mul);
    for (size_t i = 0; i < aligned; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h ^= shift_mix(w * mul) * mul;
        h *= mul;
    }
    size_t rest = len & 7;
    if (rest != 0) {
        uint64_t w = 0;
        for (size_t i = rest; i-- > 0;)
            w = (w << 8) + p[aligned + i];
        h ^= w;
        h *= mul;
    }
    h = shift_mix(h) * mul;
    return shift_mix(h);
}

/* c10::hash_combine. */
static uint64_t hash_combine(uint64_t seed, uint64_t value) {
    return seed ^ (value + 0x9e3779b9u + (seed << 6) + (seed >> 2));
}

void ck_serial_id_init(ck_serial_id *s) {
    memset(s, 0, sizeof *s);
    s->buckets = 1;
    s->head = NIL;
}

void ck_serial_id_free(ck_serial_id *s) {
    free(s->hash);
    free(s->next);
    free(s->bucket_before);
    ck_serial_id_init(s);
}

void ck_serial_id_add_crc(ck_serial_id *s, uint32_t crc) {
    s->crc_hash = hash_combine(s->crc_hash, crc);
}

static size_t next_of(const ck_serial_id *s, size_t node) {
    return node == BEFORE_BEGIN ? s->head : s->next[node];
}

static void set_next(ck_serial_id *s, size_t node, size_t value) {
    if (node == BEFORE_BEGIN)
        s->head = value;
    else
        s->next[node] = value;
}

/* _Prime_rehash_policy::_M_next_bkt with max_load_factor 1. */
static size_t next_bucket_count(ck_serial_id *s, size_t n) {
    size_t r;
    if (n < sizeof fast_buckets) {
        r = n == 0 ? 1 : fast_buckets[n];
    } else {
        size_t lo = 6, hi = N_PRIMES - 1;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (primes[mid] < n)
                lo = mid + 1;
            else
                hi = mid;
        }
        r = primes[lo];
    }
    s->next_resize = r;
    return r;
}

/* _Hashtable::_M_rehash_aux for unique keys: walks the node list and
 * pushes each node to the front of its new bucket. */
static ck_status rehash(ck_serial_id *s, size_t count, ck_error *err) {
    size_t *bb = malloc(count * sizeof *bb);
    if (bb == NULL)
        return ck_fail(err, CK_E_NOMEM, "serialization id: out of memory");
    for (size_t i = 0; i < count; i++)
        bb[i] = NIL;
    size_t p = s->head, begin_bucket = 0;
    s->head = NIL;
    while (p != NIL) {
        size_t after = s->next[p];
        size_t b = (size_t)(s->hash[p] % count);
        if (bb[b] == NIL) {
            s->next[p] = s->head;
            s->head = p;
            bb[b] = BEFORE_BEGIN;
            if (s->next[p] != NIL)
                bb[begin_bucket] = p;
            begin_bucket = b;
        } else {
            s->next[p] = next_of(s, bb[b]);
            set_next(s, bb[b], p);
        }
        p = after;
    }
    free(s->bucket_before);
    s->bucket_before = bb;
    s->buckets = count;
    return CK_OK;
}

ck_status ck_serial_id_add_name(ck_serial_id *s, const char *name, size_t len, ck_error *err) {
    if (s->count == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 16;
        uint64_t *h = realloc(s->hash, cap * sizeof *h);
        if (h == NULL)
            return ck_fail(err, CK_E_NOMEM, "serialization id: out of memory");
        s->hash = h;
        size_t *n = realloc(s->next, cap * sizeof *n);
        if (n == NULL)
            return ck_fail(err, CK_E_NOMEM, "serialization id: out of memory");
        s->next = n;
        s->cap = cap;
    }
    /* _Prime_rehash_policy::_M_need_rehash for one more element. */
    if (s->count + 1 > s->next_resize) {
        /* max_load_factor is 1, so the minimum bucket count is a whole number. */
        size_t min_buckets = s->count + 1;
        if (s->next_resize == 0 && min_buckets < 11)
            min_buckets = 11;
        if (min_buckets >= s->buckets) {
            size_t want = min_buckets + 1;
            if (want < s->buckets * 2)
                want = s->buckets * 2;
            ck_status st = rehash(s, next_bucket_count(s, want), err);
            if (st != CK_OK)
                return st;
        } else {
            s->next_resize = s->buckets;
        }
    }
    size_t k = s->count++;
    s->hash[k] = ck_std_string_hash(name, len);
    size_t b = (size_t)(s->hash[k] % s->buckets);
    if (s->bucket_before[b] != NIL) {
        s->next[k] = next_of(s, s->bucket_before[b]);
        set_next(s, s->bucket_before[b], k);
    } else {
        s->next[k] = s->head;
        s->head = k;
        if (s->next[k] != NIL)
            s->bucket_before[s->hash[s->next[k]] % s->buckets] = k;
        s->bucket_before[b] = BEFORE_BEGIN;
    }
    return CK_OK;
}

void ck_serial_id_format(const ck_serial_id *s, char out[CK_SERIAL_ID_LEN]) {
    uint64_t names = 0;
    for (size_t p = s->head; p != NIL; p = s->next[p])
        names = hash_combine(names, s->hash[p]);
    char buf[CK_SERIAL_ID_LEN + 1];
    snprintf(buf, sizeof buf, "%020llu%020llu", (unsigned long long)names,
             (unsigned long long)s->crc_hash);
    memcpy(out, buf, CK_SERIAL_ID_LEN);
}
