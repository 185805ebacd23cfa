/* The C yardstick of benchmark 1 (built by bench/b_apply.py with the system compiler, never part
 * of the package): the host's hint marking as a plain loop over the same one-bit-per-page bitmaps
 * (page p = bit p & 7 of byte p >> 3) and the same blocks, with the same semantics as
 * HostPageState.apply_blocks: skip |= block & ~written, counting pages newly marked and pages
 * refused because they were written. */
#include <stdint.h>

void apply_blocks(uint8_t *skip, const uint8_t *written, const uint64_t *starts,
                  const uint8_t *orders, int64_t n, int64_t *marked, int64_t *refused) {
    int64_t mk = 0, rf = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t s = starts[i];
        unsigned k = orders[i];
        if (k < 3) {                      /* 1, 2 or 4 pages: bits within one byte */
            uint64_t b = s >> 3;
            uint8_t m = (uint8_t)(((1u << (1u << k)) - 1u) << (s & 7));
            uint8_t w = written[b], o = skip[b];
            uint8_t add = m & (uint8_t)~w;
            rf += __builtin_popcount(m & w);
            mk += __builtin_popcount(add & (uint8_t)~o);
            skip[b] = o | add;
        } else if (k < 6) {               /* 8 to 32 pages: whole bytes */
            uint64_t b = s >> 3, e = b + (1ull << (k - 3));
            for (uint64_t j = b; j < e; j++) {
                uint8_t w = written[j], o = skip[j];
                rf += __builtin_popcount(w);
                mk += __builtin_popcount((uint8_t)~(w | o));
                skip[j] = o | (uint8_t)~w;
            }
        } else {                          /* 64 pages and more: whole 64-bit words */
            uint64_t b = s >> 6, e = b + (1ull << (k - 6));
            uint64_t *sk = (uint64_t *)skip;
            const uint64_t *wr = (const uint64_t *)written;
            for (uint64_t j = b; j < e; j++) {
                uint64_t w = wr[j], o = sk[j];
                rf += __builtin_popcountll(w);
                mk += __builtin_popcountll(~(w | o));
                sk[j] = o | ~w;
            }
        }
    }
    *marked = mk;
    *refused = rf;
}
