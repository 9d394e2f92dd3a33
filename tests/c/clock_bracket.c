/* The core's clock is CLOCK_REALTIME_COARSE's second, for
 * tests/test_core_ffi.py:  clock_bracket MILLISECONDS
 * For that long, reads tt_now_second() (time(): the vDSO's on x86-64
 * Linux) between two clock_gettime(CLOCK_REALTIME_COARSE) reads, and
 * prints how many reads fell outside that bracket (must be 0): the hot
 * path's cheaper read must not be another clock, whose second could run
 * ahead of or behind the one the rest of the package reads. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>

#include "tt_core.c"

int main(int argc, char **argv)
{
    struct timespec before, after, start, now;
    long outside = 0, samples = 0, ms = argc > 1 ? atol(argv[1]) : 500;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        clock_gettime(CLOCK_REALTIME_COARSE, &before);
        uint64_t t = tt_now_second();
        clock_gettime(CLOCK_REALTIME_COARSE, &after);
        samples++;
        if (t < (uint64_t)before.tv_sec || t > (uint64_t)after.tv_sec)
            outside++;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000 < ms);
    printf("%ld %ld\n", samples, outside);
    return 0;
}
