/* The wall clock steps back under a worker of libtrafficthreshold
 * (tests/test_core_ffi.py):  clock_back KEY
 * The program's own time() (which the library's calls resolve to: the
 * executable's symbols come first) returns the real second minus `back`.
 * tt_open finds no segment (a try: the next one due 10 s later); then the
 * clock steps back an hour (an NTP step, a restored VM); the program says
 * "ready" and waits for a line (the test installs the segment meanwhile),
 * then hits once and prints whether it attached: 1 when the attacher's
 * times followed the clock back, 0 when it waits for the clock to catch up
 * with its last try (an hour of hits lost). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "trafficthreshold.h"

static time_t back = 0;

time_t time(time_t *out)
{
    struct timespec ts;
    time_t t;
    clock_gettime(CLOCK_REALTIME, &ts);
    t = ts.tv_sec - back;
    if (out != NULL)
        *out = t;
    return t;
}

int main(int argc, char **argv)
{
    char line[16];
    tt_handle *h;
    if (argc != 2) {
        fprintf(stderr, "usage: clock_back KEY\n");
        return 2;
    }
    h = tt_open(strtol(argv[1], NULL, 0), "sysv");
    if (h == NULL || tt_attached(h))
        return 3;
    back = 3600;
    printf("ready\n");
    fflush(stdout);
    if (fgets(line, sizeof line, stdin) == NULL)
        return 4;
    tt_hit(h, "a.example", NULL, 1);
    printf("%d\n", tt_attached(h));
    tt_close(h);
    return 0;
}
