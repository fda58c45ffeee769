// Command promql-check validates Prometheus rule files and PromQL expressions offline, with
// the parser Prometheus itself uses (the same checks as `promtool check rules`, without
// building promtool and its service-discovery dependencies).
//
//	promql-check rules FILE...   rule files (the `spec` of a PrometheusRule: `groups: [...]`)
//	promql-check exprs FILE...   one PromQL expression per line (dashboard queries)
//
// Exits non-zero and names every invalid group, rule or expression.
package main

import (
	"bufio"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

func main() {
	if len(os.Args) < 3 || (os.Args[1] != "rules" && os.Args[1] != "exprs") {
		fmt.Fprintln(os.Stderr, "usage: promql-check rules|exprs FILE...")
		os.Exit(2)
	}
	promql := parser.NewParser(parser.Options{})
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	bad, good := 0, 0
	for _, file := range os.Args[2:] {
		switch os.Args[1] {
		case "rules":
			groups, errs := rulefmt.ParseFile(file, false, model.UTF8Validation, promql, logger)
			for _, err := range errs {
				fmt.Printf("%s: %v\n", file, err)
				bad++
			}
			if len(errs) == 0 {
				for _, g := range groups.Groups {
					good += len(g.Rules)
				}
			}
		case "exprs":
			f, err := os.Open(file)
			if err != nil {
				fmt.Println(err)
				bad++
				continue
			}
			scanner := bufio.NewScanner(f)
			scanner.Buffer(make([]byte, 1<<20), 1<<20)
			line := 0
			for scanner.Scan() {
				line++
				expr := strings.TrimSpace(scanner.Text())
				if expr == "" {
					continue
				}
				if _, err := promql.ParseExpr(expr); err != nil {
					fmt.Printf("%s:%d: %v\n  %s\n", file, line, err, expr)
					bad++
				} else {
					good++
				}
			}
			f.Close()
		}
	}
	fmt.Printf("%d valid, %d invalid\n", good, bad)
	if bad > 0 || good == 0 {
		os.Exit(1)
	}
}
