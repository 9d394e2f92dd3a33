--TEST--
trafficthreshold: strict mode throws (for setting up): the attach error, bad names, bad n
--EXTENSIONS--
trafficthreshold
--INI--
trafficthreshold.key=0x7e5700fd
trafficthreshold.strict=1
--FILE--
<?php
foreach ([fn() => trafficthreshold_hit(), fn() => trafficthreshold_throttle_status()] as $f) {
    try { $f(); echo "no exception\n"; }
    catch (TrafficThresholdException $e) { echo get_class($e), ": ", $e->getMessage(), "\n"; }
}
var_dump(is_subclass_of("TrafficThresholdException", "RuntimeException"));
foreach ([["all", "x:y"], ["~x"], [".."], ["a", "e", 0], ["a", "order", 1, "paid/x"], [str_repeat("a", 65)]] as $args) {
    try { trafficthreshold_hit(...$args); echo "no exception\n"; }
    catch (ValueError $e) { echo "ValueError: ", $e->getMessage(), "\n"; }
    catch (TrafficThresholdException $e) { echo "TrafficThresholdException (names were fine)\n"; }
}
// info() never throws: it shows.
var_dump(trafficthreshold_info()["attached"]);
?>
--EXPECT--
TrafficThresholdException: not counting: no trafficthreshold segment at SysV IPC key 0x7e5700fd; run `trafficthreshold install`
TrafficThresholdException: not counting: no trafficthreshold segment at SysV IPC key 0x7e5700fd; run `trafficthreshold install`
bool(true)
ValueError: event name 'x:y' contains ':', which separates the parts of the farm's Redis keys (two names would share one hash); replace it (for example with '-')
ValueError: account name '~x' starts with '~', which is reserved
ValueError: account name '..' is '.' or '..', which a stats URL cannot carry (URLs resolve it away); replace it with a name of other characters too
ValueError: n=0 is out of range; n must be 1..4294967295 per hit
ValueError: event name 'order/paid/x' has more than one '/': a '/' separates an event from its funnel status, and neither may contain '/'; replace the others (for example with '-')
ValueError: account name 'aaaaaaaaaaaaaaaaaaaa'... is 65 bytes long; the limit is 64 UTF-8 bytes: shorten it or hash it
bool(false)
