#ifndef PHP_TRAFFICTHRESHOLD_H
#define PHP_TRAFFICTHRESHOLD_H

extern zend_module_entry trafficthreshold_module_entry;
#define phpext_trafficthreshold_ptr &trafficthreshold_module_entry

#define PHP_TRAFFICTHRESHOLD_VERSION "0.1.0"

#include "tt_core.h"

/* The memo of the page view's account (tt_page_account in
 * trafficthreshold.c): per thread under ZTS, as all the module's globals,
 * so that a threaded SAPI's threads never read each other's half-written
 * memo. */
typedef struct {
    /* Copies of the settings it was made for, compared by their text: under
     * mod_php a <VirtualHost>'s php_admin_value is set again at each
     * request, and another host's value may be allocated where the last
     * one's was freed. */
    char *how, *list;
    unsigned gen;                    /* tt_settings_gen when last compared */
    char raw[256];                   /* the Host header it was made for */
    size_t raw_len;
    int ready;
    int is_host;                     /* how is "host" */
    zend_string *account;            /* persistent, hashed; NULL: the total */
    zend_string *unmemoized;         /* a too-long Host's account, until the next */
} tt_account_memo;

ZEND_BEGIN_MODULE_GLOBALS(trafficthreshold)
    char *key;
    char *backend;
    bool pageviews;
    char *account;
    char *allowed_hosts;
    bool strict;
    /* The last hit's keys by its names' zend_string pointers (interned
     * strings only), cleared at each request's end. */
    tt_hit_memo hit_memo;
    /* The request-end page view's (tt_count_page_view), kept across
     * requests, cleared when the account memo lets its string go. */
    tt_hit_memo page_hit;
    tt_account_memo page;
ZEND_END_MODULE_GLOBALS(trafficthreshold)

ZEND_EXTERN_MODULE_GLOBALS(trafficthreshold)
#define TT_G(v) ZEND_MODULE_GLOBALS_ACCESSOR(trafficthreshold, v)

#if defined(ZTS) && defined(COMPILE_DL_TRAFFICTHRESHOLD)
ZEND_TSRMLS_CACHE_EXTERN()
#endif

#endif
