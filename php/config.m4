dnl The trafficthreshold PHP extension, built the PHP way:
dnl   cd php && phpize && ./configure && make && make test && make install
dnl It compiles the package's C core (../trafficthreshold/core/tt_core.c,
dnl included by trafficthreshold.c): one implementation of the segment's
dnl algorithm for Python, PHP and libtrafficthreshold, never a copy.
PHP_ARG_ENABLE([trafficthreshold],
  [whether to enable trafficthreshold],
  [AS_HELP_STRING([--enable-trafficthreshold], [Count page views into trafficthreshold's shared-memory segment])],
  [yes])

if test "$PHP_TRAFFICTHRESHOLD" != "no"; then
  TT_CORE_DIR="$abs_srcdir/../trafficthreshold/core"
  if test ! -f "$TT_CORE_DIR/tt_core.c"; then
    AC_MSG_ERROR([the C core is not at $TT_CORE_DIR: build from a trafficthreshold checkout or sdist (php/ next to trafficthreshold/)])
  fi
  AC_MSG_CHECKING([for the trafficthreshold C core])
  AC_MSG_RESULT([$TT_CORE_DIR])
  PHP_ADD_INCLUDE([$TT_CORE_DIR])
  AC_DEFINE(HAVE_TRAFFICTHRESHOLD, 1, [ Have trafficthreshold support ])
  PHP_NEW_EXTENSION(trafficthreshold, trafficthreshold.c, $ext_shared,, [-D_GNU_SOURCE -std=gnu11 -DZEND_ENABLE_STATIC_TSRMLS_CACHE=1])
  dnl make rebuilds the extension when the core changes.
  PHP_ADD_MAKEFILE_FRAGMENT([$abs_srcdir/Makefile.frag])
fi
