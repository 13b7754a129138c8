package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/integration/uml"
)

// interopDepsCommand prepares the interoperability lab (package
// integration/uml): the host packages, the UML kernel (built once, then
// cached) and libreswan unpacked into the cache.
func interopDepsCommand() *cli.Command {
	return &cli.Command{
		Name:  "interop-deps",
		Usage: "build (or find cached) the UML kernel with ESP and espintcp, and unpack libreswan (needs root)",
		Flags: []cli.Flag{
			&cli.StringSliceFlag{Name: "series", Value: cli.NewStringSlice(uml.Series...), Usage: "linux-source series to build"},
		},
		Action: runInteropDeps,
	}
}

func runInteropDeps(c *cli.Context) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("interop-deps needs root (the cache is %s)", uml.CacheDir())
	}
	if missing := uml.MissingHostPackages(); len(missing) > 0 {
		fmt.Printf("installing the interop lab's packages (missing: %s)\n", strings.Join(missing, ", "))
		if err := uml.InstallHostPackages(c.Context, os.Stdout); err != nil {
			return err
		}
		if still := uml.MissingHostTools(); len(still) > 0 {
			return fmt.Errorf("still missing after install: %s", strings.Join(still, ", "))
		}
	}
	for _, series := range c.StringSlice("series") {
		k, err := uml.EnsureKernel(c.Context, uml.KernelOptions{
			Series: series,
			Logf:   func(f string, a ...any) { fmt.Printf(f+"\n", a...) },
		})
		if err != nil {
			return err
		}
		if k.Built {
			fmt.Printf("UML kernel from linux-source %s built in %s: %s\n", k.Version, k.BuildTime.Round(time.Second), k.Path)
		} else {
			fmt.Printf("UML kernel from linux-source %s cached: %s\n", k.Version, k.Path)
		}
	}
	sw, err := uml.EnsureLibreswan(c.Context, "")
	if err != nil {
		return err
	}
	fmt.Printf("libreswan %s unpacked: %s\n", sw.Version, sw.Root)
	return nil
}
