package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"
)

func checkConfigCommand() *cli.Command {
	return &cli.Command{
		Name:      "check-config",
		Usage:     "check a configuration file and print the effective configuration, with where each value comes from",
		ArgsUsage: "FILE",
		UsageText: "iketcp check-config FILE\n\nExample:\n\n   $ iketcp check-config /etc/iketcp/client.yaml",
		Description: "The file says what it configures with \"role: server\" or \"role: client\". Every value is checked as\n" +
			"iketcp server or iketcp client would check it, with the environment's IKETCP_* variables applied over it.\n" +
			"Example: iketcp check-config /etc/iketcp/client.yaml",
		Action: runCheckConfig,
	}
}

func runCheckConfig(c *cli.Context) error {
	if c.NArg() != 1 {
		return &configError{fmt.Errorf("check-config takes one FILE, got %d arguments", c.NArg())}
	}
	path := c.Args().First()
	file, err := readConfigFile(path, "", roleFlags)
	if err != nil {
		return err
	}
	var cmd *cli.Command
	for _, k := range c.App.Commands {
		if k.Name == file.role {
			cmd = k
		}
	}
	ins, err := buildInstances(c, cmd, nil, file)
	if err != nil {
		return err
	}
	for _, in := range ins {
		if err := checkInstance(file.role, in.ctx); err != nil {
			return &configError{in.located(err)}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# %s: valid; the effective configuration of iketcp %s, each value's source after it\n", path, file.role)
	fmt.Fprintf(&b, "role: %s\n", file.role)
	if len(file.tunnels) == 0 {
		ins[0].writeEffective(&b, "")
	} else {
		b.WriteString("tunnels:\n")
		for _, in := range ins {
			fmt.Fprintf(&b, "  - name: %s\n", in.name)
			in.writeEffective(&b, "    ")
		}
	}
	_, err = fmt.Fprint(c.App.Writer, b.String())
	return err
}
