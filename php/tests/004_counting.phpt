--TEST--
trafficthreshold: 4 forked processes count exactly into a real segment (installed by the trafficthreshold command)
--EXTENSIONS--
trafficthreshold
pcntl
--SKIPIF--
<?php
if (trim((string)shell_exec("command -v trafficthreshold")) === "") die("skip the trafficthreshold command is not on PATH (pip install trafficthreshold)");
?>
--INI--
trafficthreshold.key=0x7e5700fc
--FILE--
<?php
$key = "0x7e5700fc";
shell_exec("trafficthreshold uninstall --key $key --force --no-rollup 2>&1");
echo shell_exec("trafficthreshold install --key $key --keys 64 >/dev/null 2>&1 && echo installed");
$kids = [];
for ($k = 0; $k < 4; $k++) {
    $pid = pcntl_fork();
    if ($pid === 0) {
        for ($i = 0; $i < 25000; $i++) {
            if (!trafficthreshold_hit("example.com")) { exit(1); }
        }
        trafficthreshold_hit("shop", "order", 1, "paid");
        exit(0);
    }
    $kids[] = $pid;
}
$ok = true;
foreach ($kids as $pid) { pcntl_waitpid($pid, $status); $ok = $ok && pcntl_wexitstatus($status) === 0; }
var_dump($ok);
// Counted within this minute or the last one (the run may cross a minute).
var_dump(trafficthreshold_count("example.com", "pageview", "60s"));
var_dump(trafficthreshold_count(null, "pageview", "60s"));
var_dump(trafficthreshold_count("all", "order/paid", "60s"));
$info = trafficthreshold_info();
var_dump($info["attached"]);
echo shell_exec("trafficthreshold uninstall --key $key --force --no-rollup >/dev/null 2>&1 && echo removed");
?>
--EXPECT--
installed
bool(true)
int(100000)
int(100000)
int(4)
bool(true)
removed
