--TEST--
trafficthreshold: a bad name in a worker's first count() still leaves the reason it cannot attach in the log
--EXTENSIONS--
trafficthreshold
--INI--
trafficthreshold.key=0x7e5700fb
error_log=
log_errors=1
display_errors=0
--FILE--
<?php
var_dump(trafficthreshold_count("a/b"));
var_dump(trafficthreshold_hit());
var_dump(trafficthreshold_hit());
?>
--EXPECTF--
%Atrafficthreshold: account name 'a/b' contains '/', which cannot appear in a stats URL; replace it (for example with '-') (logged once per process)
%Atrafficthreshold: not counting: no trafficthreshold segment at SysV IPC key 0x7e5700fb; run `trafficthreshold install` (logged once per process)
int(0)
bool(false)
bool(false)
