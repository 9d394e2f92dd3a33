#ifndef PHP_TRAFFICTHRESHOLD_H
#define PHP_TRAFFICTHRESHOLD_H

extern zend_module_entry trafficthreshold_module_entry;
#define phpext_trafficthreshold_ptr &trafficthreshold_module_entry

#define PHP_TRAFFICTHRESHOLD_VERSION "0.1.0"

ZEND_BEGIN_MODULE_GLOBALS(trafficthreshold)
    char *key;
    char *backend;
    bool pageviews;
    char *account;
    char *allowed_hosts;
    bool strict;
ZEND_END_MODULE_GLOBALS(trafficthreshold)

ZEND_EXTERN_MODULE_GLOBALS(trafficthreshold)
#define TT_G(v) ZEND_MODULE_GLOBALS_ACCESSOR(trafficthreshold, v)

#if defined(ZTS) && defined(COMPILE_DL_TRAFFICTHRESHOLD)
ZEND_TSRMLS_CACHE_EXTERN()
#endif

#endif
