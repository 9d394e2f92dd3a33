/* A small C program over libtrafficthreshold (trafficthreshold.h), for
 * tests/test_core_ffi.py:  ffi_hits KEY N ACCOUNT
 * counts N page views of ACCOUNT (and the total) and one "order/paid",
 * then prints "ok", or the error and exits 1.  With N = 0 it only prints
 * whether it attached and why not. */
#include <stdio.h>
#include <stdlib.h>

#include "trafficthreshold.h"

int main(int argc, char **argv)
{
    tt_handle *h;
    long n;
    if (argc != 4) {
        fprintf(stderr, "usage: ffi_hits KEY N ACCOUNT\n");
        return 2;
    }
    h = tt_open(strtol(argv[1], NULL, 0), NULL);
    if (h == NULL)
        return 3;
    n = atol(argv[2]);
    if (n == 0) {
        printf("attached=%d layout=%d error=%s\n", tt_attached(h), tt_layout_version(),
               tt_error(h));
        printf("hit=%d level=%d count=%lld\n", tt_hit(h, "example.com", NULL, 1),
               tt_throttle_status(h), (long long)tt_count(h, NULL, NULL, 1));
        tt_close(h);
        return 0;
    }
    for (long i = 0; i < n; i++) {
        if (tt_hit(h, argv[3], NULL, 1) != 0) {
            printf("error: %s\n", tt_error(h));
            return 1;
        }
    }
    if (tt_hit(h, argv[3], "order/paid", 1) != 0 || tt_hit(h, "a:b", NULL, 1) == 0) {
        printf("error: %s\n", tt_error(h));
        return 1;
    }
    printf("ok %s\n", tt_error(h));
    tt_close(h);
    return 0;
}
