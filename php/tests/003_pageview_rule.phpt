--TEST--
trafficthreshold: the page-view rule follows the shared table (tests/data/pageview_cases.json), as the Python rules do
--EXTENSIONS--
trafficthreshold
--FILE--
<?php
$table = json_decode(file_get_contents(__DIR__ . "/../../tests/data/pageview_cases.json"), true);
$bad = 0;
foreach ($table["cases"] as $case) {
    $got = trafficthreshold_is_page_view($case["status"], $case["content_type"], $case["accept"]);
    if ($got !== $case["counted"]) {
        $bad++;
        echo "differs: ", json_encode($case), "\n";
    }
}
echo count($table["cases"]) > 30 ? "cases: many\n" : "cases: too few\n";
echo "differ: $bad\n";
// The method and the path: HEAD never, static files and health checks never.
var_dump(trafficthreshold_is_page_view(200, "text/html", null, "HEAD"));
var_dump(trafficthreshold_is_page_view(200, "text/html", null, "POST"));
var_dump(trafficthreshold_is_page_view(200, "text/html", null, "GET", "/static/a"));
var_dump(trafficthreshold_is_page_view(200, "text/html", null, "GET", "/x/style.CSS"));
var_dump(trafficthreshold_is_page_view(200, "text/html", null, "GET", "/healthz"));
var_dump(trafficthreshold_is_page_view(200, "text/html", null, "GET", "/a.b/page"));
var_dump(trafficthreshold_is_page_view(302, "text/html"));
var_dump(trafficthreshold_is_page_view(404, "text/html"));
?>
--EXPECT--
cases: many
differ: 0
bool(false)
bool(false)
bool(false)
bool(false)
bool(false)
bool(true)
bool(false)
bool(false)
