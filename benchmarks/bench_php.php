<?php
// Per-call cost from php-cli of ways to count a page view, side by side in
// one run (benchmarks/bench_php.py runs this and reports ratios), and the
// exactness of each from 4 forked processes.
//
//   php -d apc.enable_cli=1 [-d extension=...] bench_php.php N KEY [ROUNDS]
//
// Prints one JSON object: {"ns": {method: ns per call}, "exact": {method:
// [expected, counted]}}.  "pepper" is the Mint pepper's own method: a
// sysvsem semaphore around a shmop read and write of the counter.
declare(strict_types=1);

$n = (int)($argv[1] ?? 1000000);
$key = (int)($argv[2] ?? 0x54546899);

function empty_fn(string $a): bool { return true; }

function pepper_open(int $key): array {
    $sem = sem_get($key, 1, 0600, true);
    $shm = shmop_open($key, "c", 0600, 8);
    return [$sem, $shm];
}

function pepper_inc(array $h): void {
    sem_acquire($h[0]);
    $v = unpack("q", shmop_read($h[1], 0, 8))[1];
    shmop_write($h[1], pack("q", $v + 1), 0);
    sem_release($h[0]);
}

function pepper_read(array $h): int {
    return unpack("q", shmop_read($h[1], 0, 8))[1];
}

$methods = [
    "empty_function" => function (int $n) { for ($i = 0; $i < $n; $i++) { empty_fn("example.com"); } },
    "crc32" => function (int $n) { for ($i = 0; $i < $n; $i++) { crc32("example.com"); } },
];
if (function_exists("apcu_inc") && apcu_enabled()) {
    $methods["apcu_inc"] = function (int $n) { for ($i = 0; $i < $n; $i++) { apcu_inc("example.com", 1); } };
}
$pepper = pepper_open($key);
shmop_write($pepper[1], pack("q", 0), 0);
$methods["pepper"] = function (int $n) use ($pepper) { for ($i = 0; $i < $n; $i++) { pepper_inc($pepper); } };
if (function_exists("trafficthreshold_hit")) {
    $methods["trafficthreshold_hit"] = function (int $n) { for ($i = 0; $i < $n; $i++) { trafficthreshold_hit("example.com"); } };
}
$loop = function (int $n) { for ($i = 0; $i < $n; $i++) { } };

// The methods are timed side by side: each round times the empty loop and
// every method once, in turn, so that a burst of load from other processes
// (2 shared cores) falls on one round of all of them instead of on all
// rounds of one; each method's figure is its best round (the noise only
// ever adds), the best empty loop subtracted.  The pepper's method, 200x
// slower, runs a twentieth of the calls.
$rounds = (int)($argv[3] ?? 7);
$calls = [];
foreach ($methods as $name => $f) { $calls[$name] = $name === "pepper" ? intdiv($n, 20) : $n; }
$best = ["loop" => INF] + array_fill_keys(array_keys($methods), INF);
for ($round = 0; $round < $rounds; $round++) {
    $t = hrtime(true);
    $loop($n);
    $best["loop"] = min($best["loop"], (hrtime(true) - $t) / $n);
    foreach ($methods as $name => $f) {
        $t = hrtime(true);
        $f($calls[$name]);
        $best[$name] = min($best[$name], (hrtime(true) - $t) / $calls[$name]);
    }
}
$ns = [];
foreach ($methods as $name => $f) {
    $ns[$name] = max(0.0, $best[$name] - $best["loop"]);
}

// Exactness from 4 forked processes (APCu shares its memory with forked
// children: one pool only, as under php-fpm).
$exact = [];
$per = intdiv($n, 4);
$readers = [
    "apcu_inc" => function () { return (int)apcu_fetch("exact"); },
    "pepper" => function () use ($pepper) { return pepper_read($pepper); },
];
$incs = [
    "apcu_inc" => function () { apcu_inc("exact", 1); },
    "pepper" => function () use ($pepper) { pepper_inc($pepper); },
];
if (function_exists("trafficthreshold_hit")) {
    $readers["trafficthreshold_hit"] = function () { return trafficthreshold_count("exact", "pageview", "60s"); };
    $incs["trafficthreshold_hit"] = function () { trafficthreshold_hit("exact"); };
}
foreach ($incs as $name => $inc) {
    if (!isset($methods[$name])) { continue; }
    if ($name === "apcu_inc") { apcu_store("exact", 0); }
    if ($name === "pepper") { shmop_write($pepper[1], pack("q", 0), 0); }
    $before = $readers[$name]();
    $kids = [];
    for ($k = 0; $k < 4; $k++) {
        $pid = pcntl_fork();
        if ($pid === 0) { for ($i = 0; $i < $per; $i++) { $inc(); } exit(0); }
        $kids[] = $pid;
    }
    foreach ($kids as $pid) { pcntl_waitpid($pid, $status); }
    $exact[$name] = [4 * $per, $readers[$name]() - $before];
}
sem_remove($pepper[0]);
shmop_delete($pepper[1]);
echo json_encode(["ns" => $ns, "exact" => $exact]), "\n";
