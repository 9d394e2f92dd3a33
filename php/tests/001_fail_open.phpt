--TEST--
trafficthreshold: without a segment nothing fails: false/0, the reason in info(), one log line per kind
--EXTENSIONS--
trafficthreshold
--INI--
trafficthreshold.key=0x7e5700fe
error_log=
log_errors=1
display_errors=0
--FILE--
<?php
var_dump(trafficthreshold_hit());
var_dump(trafficthreshold_hit("example.com", "pageview", 3));
var_dump(trafficthreshold_hit("a/b"));
var_dump(trafficthreshold_hit("a/b"));
var_dump(trafficthreshold_count("example.com"));
var_dump(trafficthreshold_throttle_status());
$info = trafficthreshold_info();
var_dump($info["attached"], $info["key_hex"], $info["backend"]);
echo $info["error"], "\n";
var_dump($info["layout_version"] === TRAFFICTHRESHOLD_LAYOUT_VERSION);
?>
--EXPECTF--
%Atrafficthreshold: not counting: no trafficthreshold segment at SysV IPC key 0x7e5700fe; run `trafficthreshold install` (logged once per process)
bool(false)
bool(false)
%Atrafficthreshold: account name 'a/b' contains '/', which cannot appear in a stats URL; replace it (for example with '-') (logged once per process)
bool(false)
bool(false)
int(0)
int(0)
bool(false)
string(10) "0x7e5700fe"
NULL
no trafficthreshold segment at SysV IPC key 0x7e5700fe; run `trafficthreshold install`
bool(true)
