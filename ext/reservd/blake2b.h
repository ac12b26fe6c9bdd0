/* BLAKE2b (RFC 7693), unkeyed, with a personalisation string: the same bytes as Python's
 * hashlib.blake2b(data, digest_size=n, person=p). reservd._cfinished hashes ids with it inside
 * the call that probes the finished-record table, so a Reserve needs no hashlib object and no
 * second crossing into C (reservd.finished defines the keys; tests compare with hashlib). */
#ifndef RESERVD_BLAKE2B_H
#define RESERVD_BLAKE2B_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static const uint64_t reservd_blake2b_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t reservd_blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t reservd_load64(const uint8_t* p) {
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

static inline uint64_t reservd_rotr64(uint64_t x, unsigned n) {
    return (x >> n) | (x << (64 - n));
}

#define RESERVD_G(a, b, c, d, x, y)            \
    do {                                       \
        v[a] = v[a] + v[b] + (x);              \
        v[d] = reservd_rotr64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];                    \
        v[b] = reservd_rotr64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);              \
        v[d] = reservd_rotr64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];                    \
        v[b] = reservd_rotr64(v[b] ^ v[c], 63); \
    } while (0)

static void reservd_blake2b_compress(uint64_t h[8], const uint8_t block[128], uint64_t t,
                                     int last) {
    uint64_t v[16], m[16];
    int i;
    for (i = 0; i < 16; i++) m[i] = reservd_load64(block + 8 * i);
    for (i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = reservd_blake2b_iv[i];
    }
    v[12] ^= t;  /* inputs here are far below 2^64 bytes: the high counter word stays 0 */
    if (last) v[14] = ~v[14];
    for (i = 0; i < 12; i++) {
        const uint8_t* s = reservd_blake2b_sigma[i];
        RESERVD_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        RESERVD_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        RESERVD_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        RESERVD_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        RESERVD_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        RESERVD_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        RESERVD_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        RESERVD_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

#undef RESERVD_G

/* out[0..outlen) = BLAKE2b-(8 * outlen) of data[0..len) with the 16-byte personalisation
 * person (hashlib pads a shorter one with zeros); 1 <= outlen <= 64. */
static void reservd_blake2b(uint8_t* out, size_t outlen, const uint8_t* data, size_t len,
                            const uint8_t person[16]) {
    uint64_t h[8];
    uint8_t block[128];
    uint64_t t = 0;
    size_t i;
    for (i = 0; i < 8; i++) h[i] = reservd_blake2b_iv[i];
    h[0] ^= 0x01010000ULL ^ (uint64_t)outlen;  /* fanout 1, depth 1, no key */
    h[6] ^= reservd_load64(person);
    h[7] ^= reservd_load64(person + 8);
    while (len > 128) {
        t += 128;
        reservd_blake2b_compress(h, data, t, 0);
        data += 128;
        len -= 128;
    }
    memset(block, 0, sizeof block);
    if (len) memcpy(block, data, len);
    t += len;
    reservd_blake2b_compress(h, block, t, 1);
    for (i = 0; i < outlen; i++) out[i] = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
}

#endif
