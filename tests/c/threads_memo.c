/* The PHP extension's thread model (a ZTS build: Apache's event MPM with a
 * threaded PHP, FrankenPHP) over the C core, for tests/test_core_ffi.py:
 *   threads_memo KEY BACKEND THREADS HITS
 * THREADS threads share one writer under one mutex (the extension's
 * TT_LOCK), each with its own memos (the extension keeps them in its
 * module globals, one copy per thread under ZTS): a tt_hit_memo of names
 * identified by their pointers, and a page-account memo.  Each thread
 * alternates two accounts of its own ("t<i>a.example", "t<i>b.example"),
 * so its memo is refilled all the time while the other threads use
 * theirs; between its hits it rebuilds its page-account memo outside the
 * lock (as tt_page_account runs outside it), which another thread reading
 * a shared memo would see half written.  Prints "ok" (then the Python test
 * checks every count), or what went wrong and exits 1. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "tt_core.c"

static tt_writer writer;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long hits;
static int failed;

/* A thread's memo of its page's account: the name and its length, written
 * in two steps (the extension's tt_account_memo, copied at each change). */
typedef struct {
    char name[32];
    size_t len;
} page_memo;

static __thread page_memo my_page;  /* per thread, as ZTS module globals */

static void *run(void *arg)
{
    long t = (long)arg, i;
    char names[2][32];
    tt_hit_memo memo = {0};
    size_t lens[2];
    lens[0] = (size_t)snprintf(names[0], sizeof names[0], "t%lda.example", t);
    lens[1] = (size_t)snprintf(names[1], sizeof names[1], "t%ldb.example", t);
    for (i = 0; i < hits; i++) {
        int which = (int)(i & 1), rc;
        /* The page memo, rebuilt outside the lock; then read back. */
        memcpy(my_page.name, names[which], lens[which]);
        my_page.len = lens[which];
        if (my_page.len != lens[which] || memcmp(my_page.name, names[which], lens[which]) != 0) {
            fprintf(stderr, "thread %ld read another thread's page memo\n", t);
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
            return NULL;
        }
        pthread_mutex_lock(&lock);
        rc = tt_writer_hit_memo(&writer, &memo, names[which], "pageview", my_page.name,
                                my_page.len, 0, "pageview", 8, 0, 1, tt_now_second());
        pthread_mutex_unlock(&lock);
        if (rc != 0) {
            fprintf(stderr, "thread %ld: %s\n", t, writer.s.error);
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
            return NULL;
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t th[64];
    long n, t;
    if (argc != 5) {
        fprintf(stderr, "usage: threads_memo KEY BACKEND THREADS HITS\n");
        return 2;
    }
    n = atol(argv[3]);
    hits = atol(argv[4]);
    if (n < 1 || n > 64)
        return 2;
    tt_core_init();
    writer.s.semid = -1;
    if (tt_writer_attach(&writer, strcmp(argv[2], "posix") == 0 ? TT_BACKEND_POSIX
                         : TT_BACKEND_SYSV, strtol(argv[1], NULL, 0)) != 0) {
        fprintf(stderr, "%s\n", writer.s.error);
        return 1;
    }
    for (t = 0; t < n; t++)
        pthread_create(&th[t], NULL, run, (void *)t);
    for (t = 0; t < n; t++)
        pthread_join(th[t], NULL);
    tt_writer_detach(&writer);
    if (failed)
        return 1;
    printf("ok\n");
    return 0;
}
