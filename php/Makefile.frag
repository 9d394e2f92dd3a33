# The core is #included by trafficthreshold.c: rebuild when it changes.
trafficthreshold.lo: $(srcdir)/../trafficthreshold/core/tt_core.c $(srcdir)/../trafficthreshold/core/tt_core.h $(srcdir)/../trafficthreshold/core/tt_layout.h $(srcdir)/../trafficthreshold/core/tt_pageview.c
