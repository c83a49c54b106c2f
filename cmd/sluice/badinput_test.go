package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/loader"
)

// Every subcommand refuses bad input with one line on stderr that names the
// command, the problem and the fix, exit 2 for bad usage (1 where a path
// names no usable cgroup), and nothing on stdout. Each case fails while
// parsing, before requireRoot or any BPF call, so it runs as any user and
// changes nothing: the cgroups named do not exist or are refused first.
func TestCLIBadInput(t *testing.T) {
	dir := t.TempDir()
	file := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	dupRoutes := file("dup.yaml", "routes:\n  - service: 198.19.0.10:80\n    backendRefs:\n      - {address: 198.18.2.2, port: 8080, weight: 1}\n      - {address: 198.18.2.2, port: 8080, weight: 2}\n")
	goodRoutes := file("good.yaml", "routes:\n  - service: 198.19.0.10:80\n    backendRefs:\n      - {address: 198.18.2.2, port: 8080, weight: 1}\n")
	emptyRoutes := file("empty.yaml", "")
	misspelt := file("annotations-misspelt", "sluice.dev/offload-port=\"8080\"\n")
	badPort := file("annotations-bad-port", "sluice.dev/offload-ports=\"80x\"\n")
	unquoted := file("annotations-unquoted", "sluice.dev/splice=true\n")

	// A cgroup path that parses but must never be reached for these cases:
	// no such directory exists.
	cg := []string{"--cgroup", "/sys/fs/cgroup/sluice-badinput-no-such-pod"}
	with := func(args ...string) []string { return append(append([]string{}, args...), cg...) }
	vip, be := "198.19.0.10:80", "198.18.2.2:8080=1"

	type tc struct {
		name string
		args []string
		code int
		want []string // the problem, then the fix
	}
	tests := []tc{
		{"unknown command", []string{"bogus"}, 2, []string{`unknown command "bogus"`, "run 'sluice help'"}},

		{"install unknown flag", with("install", "--bogus"), 2, []string{"unknown flag -bogus", "run 'sluice install --help'"}},
		{"install unknown flag with a newline", with("install", "--bo\ngus"), 2, []string{`unknown flag -bo\ngus`, "run 'sluice install --help'"}},
		{"install port 0", with("install", "-p", "0"), 2, []string{"port 0 is out of range", "want 1-65535"}},
		{"install port 70000", with("install", "-p", "70000"), 2, []string{"port 70000 is out of range", "want 1-65535"}},
		{"install port not a number", with("install", "-z", "http"), 2, []string{`"http" is not a port number`, "want 1-65535"}},
		{"install port range backwards", with("install", "-o", "200-100"), 2, []string{"runs backwards", "write it low-high"}},
		{"install CIDR /33", with("install", "-x", "10.0.0.0/33"), 2, []string{`"10.0.0.0/33" is not a CIDR`, "want a.b.c.d/n"}},
		{"install exclude everything", with("install", "-x", "*"), 2, []string{"-x '*' is not supported", "list the CIDRs"}},
		{"install uid name", with("install", "-u", "root"), 2, []string{`"root" is not a numeric uid`, "give the number"}},
		{"install root proxy", with("install", "-u", "0"), 2, []string{"would exempt every root process", "pass --allow-root-proxy"}},
		{"install same ports", with("install", "-p", "15006"), 2, []string{"both 15006", "give the sidecar two different ports"}},
		{"install TPROXY", with("install", "-m", "TPROXY"), 2, []string{`interception mode "TPROXY"`, "use -m REDIRECT"}},
		{"install bad bool", with("install", "--splice=maybe"), 2, []string{`invalid boolean value "maybe" for -splice`, "want true or false"}},
		{"install log level", with("install", "--log-level", "loud"), 2, []string{`log level "loud"`, "want debug, info, warn or error"}},
		{"install flag without value", []string{"install", "--cgroup"}, 2, []string{"flag needs an argument: -cgroup", "run 'sluice install --help'"}},
		{"install offload without splice", with("install", "--offload-ports", "8080"), 2, []string{"--offload-ports and --offload-inbound-ports", "add --splice"}},
		{"install annotations missing", with("install", "--annotations", filepath.Join(dir, "none")), 2, []string{"no such file", "mount the pod's annotations with a downwardAPI volume"}},
		{"install annotation misspelt", with("install", "--annotations", misspelt), 2, []string{"unknown annotation sluice.dev/offload-port", "fix the pod's annotation"}},
		{"install annotation bad port", with("install", "--annotations", badPort), 2, []string{`annotation sluice.dev/offload-ports="80x": "80x" is not a port number`, "fix the pod's annotation"}},
		{"install annotation unquoted", with("install", "--annotations", unquoted), 2, []string{`the value of "sluice.dev/splice" is not a quoted string`, "--annotations"}},
		{"install extra argument", with("install", "extra"), 2, []string{`unexpected argument "extra"`, "every option is a flag"}},
		{"install no cgroup outside a pod", []string{"install"}, 2, []string{"no --cgroup given", "use 'sluice install --cgroup' with the pod's cgroup v2 directory"}},
		{"install probe port 0", with("install", "--probe-port", "0"), 2, []string{"port 0 is out of range", "want 1-65535"}},
		{"install DNS without nameservers", with("install", "--redirect-dns", "--resolv-conf", "/nonexistent"), 2, []string{"--redirect-dns: the pod's nameservers: open /nonexistent", "give --dns-servers, or --capture-all-dns"}},
		{"install capture-all-dns alone", with("install", "--capture-all-dns"), 2, []string{"--capture-all-dns needs --redirect-dns"}},
		{"install DNS port a listener's", with("install", "--redirect-dns", "--capture-all-dns", "--dns-port", "15001"), 2, []string{"--dns-port 15001 is also a proxy listener's port"}},
		{"install DNS server not an address", with("install", "--redirect-dns", "--dns-servers", "ns1"), 2, []string{`"ns1" is not an IP address`}},
		{"install fail-open not a bool", with("install", "--fail-open=sometimes"), 2, []string{`invalid boolean value "sometimes" for -fail-open`, "want true or false"}},

		{"istio-iptables TPROXY", []string{"istio-iptables", "-m", "TPROXY"}, 2, []string{"-m TPROXY is not supported", "use -m REDIRECT"}},
		{"istio-iptables CIDR /33", []string{"istio-iptables", "-x", "10.0.0.0/33"}, 2, []string{`"10.0.0.0/33" is not a CIDR`, "run 'sluice istio-iptables --help'"}},
		{"istio-iptables unknown flag", []string{"istio-iptables", "--bogus"}, 2, []string{"unknown flag: --bogus", "run 'sluice istio-iptables --help'"}},
		{"istio-iptables extra argument", []string{"istio-iptables", "eth0"}, 2, []string{`unexpected argument "eth0"`, "takes flags only"}},
		{"istio-iptables log level", []string{"istio-iptables", "--log_output_level", "default:loud"}, 2, []string{`level "loud"`, "want debug, info, warn, error, fatal or none"}},
		{"proxy-init no ports", []string{"proxy-init", "--proxy-uid", "2102"}, 2, []string{"--incoming-proxy-port must be a valid TCP port number", "1-65535"}},
		{"proxy-init no uid", []string{"proxy-init", "-p", "4143", "-o", "4140"}, 2, []string{"--proxy-uid is required", "Linkerd's is 2102"}},
		{"proxy-init subnets", []string{"proxy-init", "-p", "4143", "-o", "4140", "-u", "2102", "--subnets-to-ignore", "198.18.0.0/16"}, 2, []string{"--subnets-to-ignore is not supported", "leave it out"}},
		{"proxy-init port not a number", []string{"proxy-init", "-p", "http"}, 2, []string{`invalid argument "http"`, "run 'sluice proxy-init --help'"}},

		{"agent gc interval 0", []string{"agent", "--gc-interval", "0s"}, 2, []string{"--gc-interval 0s", "want a positive duration"}},
		{"agent log level", []string{"agent", "--log-level", "loud"}, 2, []string{`log level "loud"`, "want debug, info, warn or error"}},
		{"agent extra argument", []string{"agent", "now"}, 2, []string{`unexpected argument "now"`, "every option is a flag"}},
		{"agent kubeconfig alone", []string{"agent", "--kubeconfig", "/etc/kubeconfig"}, 2, []string{"--kubeconfig is for --kubernetes", "add --kubernetes"}},
		{"agent kubeconfig missing", []string{"agent", "--kubernetes", "--kubeconfig", "/nonexistent/kubeconfig"}, 2, []string{"--kubeconfig: open /nonexistent/kubeconfig"}},

		{"status all and cgroup", with("status", "--all"), 2, []string{"--all and --cgroup both given", "pick one"}},
		{"route set pods and cgroup", with("route", "set", "--pods", "*x*", vip, be), 2, []string{"--cgroup and --pods both given", "pick one pod"}},
		{"route list pods", []string{"route", "list", "--pods", "*x*"}, 2, []string{"--pods is for set, delete and apply", "with --cgroup"}},
		{"install not a cgroup", []string{"install", "--cgroup", dir}, 1, []string{"is not a cgroup v2 directory", "pass a directory below the cgroup2 mount"}},

		{"uninstall unknown flag", with("uninstall", "-p", "15001"), 2, []string{"unknown flag -p", "run 'sluice uninstall --help'"}},
		{"uninstall extra argument", with("uninstall", "mypod"), 2, []string{`unexpected argument "mypod"`, "every option is a flag"}},
		{"uninstall no cgroup", []string{"uninstall"}, 2, []string{"--cgroup is required", "pass the pod's cgroup v2 directory"}},
		{"uninstall node and cgroup", []string{"uninstall", "--node", "--cgroup", "/sys/fs/cgroup/x"}, 2, []string{"--node and --cgroup exclude each other", "uninstall the pod, then the node"}},

		{"run port 0", []string{"run", "-p", "0"}, 2, []string{"port 0 is out of range", "want 1-65535"}},
		{"run port 70000", []string{"run", "-z", "70000"}, 2, []string{"port 70000 is out of range", "want 1-65535"}},
		{"run gid name", []string{"run", "-g", "istio-proxy"}, 2, []string{`"istio-proxy" is not a numeric gid`, "give the number"}},
		{"run duration without unit", []string{"run", "--drain", "5"}, 2, []string{`invalid value "5" for flag -drain`, "want a duration such as 30s"}},
		{"run bad duration", []string{"run", "--idle-timeout", "forever"}, 2, []string{`invalid value "forever" for flag -idle-timeout`, "want a duration"}},
		{"agent bad number", []string{"agent", "--max-destinations", "many"}, 2, []string{`invalid value "many" for flag -max-destinations`, "want a whole number"}},
		{"agent max destinations 0", []string{"agent", "--max-destinations", "0"}, 2, []string{"--max-destinations 0", "want at least 1"}},
		{"run log level", []string{"run", "--log-level", "loud"}, 2, []string{`log level "loud"`, "want debug, info, warn or error"}},
		{"run log format", []string{"run", "--log-format", "xml"}, 2, []string{`log format "xml"`, "want text or json"}},
		{"run capture flag", []string{"run", "-x", "10.0.0.0/8"}, 2, []string{"unknown flag -x", "run 'sluice run --help'"}},
		{"run extra argument", []string{"run", "now"}, 2, []string{`unexpected argument "now"`, "every option is a flag"}},
		{"run not a cgroup", []string{"run", "--cgroup", dir}, 1, []string{"is not a cgroup v2 directory", "pass a directory below the cgroup2 mount"}},

		{"status no cgroup", []string{"status"}, 2, []string{"--cgroup is required", "pass the pod's cgroup v2 directory"}},
		{"status bad bool", with("status", "--json=yes please"), 2, []string{`invalid boolean value "yes please" for -json`, "want true or false"}},
		{"status extra argument", with("status", "mypod"), 2, []string{`unexpected argument "mypod"`, "every option is a flag"}},

		{"flows interval 0", []string{"flows", "--watch", "--interval", "0"}, 2, []string{"--interval 0s", "want a positive duration"}},
		{"flows bad interval", []string{"flows", "--interval", "1"}, 2, []string{`invalid value "1" for flag -interval`, "want a duration"}},
		{"flows bad address", []string{"flows", "--addr", "http://[::1"}, 2, []string{`--addr "http://[::1"`, "missing ']' in host", "want the agent's address"}},
		{"flows bad address follow", []string{"flows", "--follow", "--addr", "http://[::1"}, 2, []string{`--addr "http://[::1"`, "want the agent's address"}},
		{"flows extra argument", []string{"flows", "pod"}, 2, []string{`unexpected argument "pod"`, "every option is a flag"}},

		{"route no subcommand", []string{"route"}, 2, []string{"want a subcommand", "run 'sluice route --help'"}},
		{"route flag first", with("route", "set"), 2, []string{"want VIP:PORT and at least one BACKEND=WEIGHT", "run 'sluice route --help'"}},
		{"route unknown subcommand", with("route", "bogus"), 2, []string{`unknown route subcommand "bogus"`, "want set, list, delete, apply or rollout"}},
		{"route set no backends", with("route", "set", vip), 2, []string{"want VIP:PORT and at least one BACKEND=WEIGHT", "run 'sluice route --help'"}},
		{"route set bad backend", with("route", "set", vip, "a:b=c"), 2, []string{`backend "a:b=c": "a:b" is not ADDRESS:PORT`, "[2001:db8::1]:8080"}},
		{"route set no weight", with("route", "set", vip, "198.18.2.2:8080"), 2, []string{`backend "198.18.2.2:8080"`, "want ADDRESS:PORT=WEIGHT"}},
		{"route set weight -1", with("route", "set", vip, "198.18.2.2:8080=-1"), 2, []string{`weight "-1"`, "want a whole number"}},
		{"route set weight too big", with("route", "set", vip, "198.18.2.2:8080=1000001"), 2, []string{"weight 1000001", "at most 1000000"}},
		{"route set all zero", with("route", "set", vip, "198.18.2.2:8080=0"), 2, []string{"every weight is 0", "pass --allow-zero"}},
		{"route set duplicate", with("route", "set", vip, be, "[::ffff:198.18.2.2]:8080=2"), 2, []string{"listed twice", "give each backend once"}},
		{"route set family", with("route", "set", vip, "[2001:db8::2]:8080=1"), 2, []string{"another IP family", "give IPv4 backends"}},
		{"route set zone", with("route", "set", "[fe80::10]:80", "[fe80::2%eth0]:8080=1"), 2, []string{"zone", "give the address without it"}},
		{"route set bad service", with("route", "set", "nope", be), 2, []string{`service "nope"`, "want VIP:PORT"}},
		{"route set service port 0", with("route", "set", "198.19.0.10:0", be), 2, []string{`service "198.19.0.10:0"`, "want VIP:PORT"}},
		{"route set bad mode", with("route", "set", "--mode", "sticky", vip, be), 2, []string{`mode "sticky"`, "want random or round-robin"}},
		{"route set unknown flag", with("route", "set", vip, be, "--weight", "5"), 2, []string{"unknown flag -weight", "run 'sluice route --help'"}},
		{"route set no cgroup", []string{"route", "set", vip, be}, 2, []string{"--cgroup is required", "pass the pod's cgroup v2 directory"}},
		{"route set not a cgroup", []string{"route", "set", "--cgroup", dir, vip, be}, 1, []string{"is not a cgroup v2 directory", "pass a directory below the cgroup2 mount"}},
		{"route list extra argument", with("route", "list", vip), 2, []string{`unexpected argument "198.19.0.10:80"`, "every option is a flag"}},
		{"route list no cgroup", []string{"route", "list"}, 2, []string{"--cgroup is required", "pass the pod's cgroup v2 directory"}},
		{"route delete no service", with("route", "delete"), 2, []string{"want the service's VIP:PORT", "run 'sluice route --help'"}},
		{"route delete two services", with("route", "delete", vip, "198.19.0.11:80"), 2, []string{"want the service's VIP:PORT", "run 'sluice route --help'"}},
		{"route delete bad service", with("route", "delete", "198.19.0.10"), 2, []string{`service "198.19.0.10"`, "want VIP:PORT"}},
		{"route delete no cgroup", []string{"route", "delete", vip}, 2, []string{"--cgroup is required", "pass the pod's cgroup v2 directory"}},
		{"route apply no file", with("route", "apply"), 2, []string{"-f FILE is required", "run 'sluice route --help'"}},
		{"route apply missing file", with("route", "apply", "-f", filepath.Join(dir, "none.yaml")), 1, []string{"read route file", "pass -f a YAML or JSON file", "no such file"}},
		{"route apply duplicate backend", with("route", "apply", "-f", dupRoutes), 2, []string{dupRoutes + ": route 198.19.0.10:80: backend 198.18.2.2:8080 is listed twice", "give each backend once"}},
		{"route apply empty file", with("route", "apply", "-f", emptyRoutes), 2, []string{"route file is empty", "want a top-level 'routes:' list"}},
		{"route apply extra argument", with("route", "apply", "-f", goodRoutes, "more.yaml"), 2, []string{`unexpected argument "more.yaml"`, "every option is a flag"}},
		{"route apply no cgroup", []string{"route", "apply", "-f", goodRoutes}, 2, []string{"--cgroup is required", "pass the pod's cgroup v2 directory"}},
		{"route rollout no service", with("route", "rollout", "--to", "198.18.3.2:8080"), 2, []string{"want the service's VIP:PORT", "run 'sluice route --help'"}},
		{"route rollout no canary", with("route", "rollout", vip), 2, []string{"--to is required", "a pod's route: ADDRESS:PORT"}},
		{"route rollout bad canary", with("route", "rollout", vip, "--to", "198.18.3.2"), 2, []string{`--to "198.18.3.2"`, "want the canary's ADDRESS:PORT"}},
		{"route rollout step 0", with("route", "rollout", vip, "--to", "198.18.3.2:8080", "--step", "0"), 2, []string{"--step 0", "want 1 to 100"}},
		{"route rollout step 5000", with("route", "rollout", vip, "--to", "198.18.3.2:8080", "--step", "5000"), 2, []string{"--step 5000", "want 1 to 100"}},
		{"route rollout step -1", with("route", "rollout", vip, "--to", "198.18.3.2:8080", "--step", "-1"), 2, []string{`invalid value "-1" for flag -step`, "want a whole number"}},
		{"route rollout interval 0", with("route", "rollout", vip, "--to", "198.18.3.2:8080", "--interval", "0"), 2, []string{"--interval 0s", "want a positive duration"}},
		{"route rollout bad ratio", with("route", "rollout", vip, "--to", "198.18.3.2:8080", "--max-connect-failure-ratio", "2"), 2, []string{"--max-connect-failure-ratio 2", "want 0 to 1"}},
		{"route rollout ratio not a number", with("route", "rollout", vip, "--to", "198.18.3.2:8080", "--max-connect-failure-ratio", "5%"), 2, []string{`invalid value "5%" for flag -max-connect-failure-ratio`, "want a number"}},
		{"route rollout httproute no namespace", []string{"route", "rollout", "--httproute", "web", "--to", "web-v2", "--prometheus", "x"}, 2, []string{`--httproute "web"`, "want NAMESPACE/NAME"}},
		{"route rollout httproute no prometheus", []string{"route", "rollout", "--httproute", "shop/web", "--to", "web-v2"}, 2, []string{"--httproute needs --prometheus URL"}},
		{"route rollout httproute address canary", []string{"route", "rollout", "--httproute", "shop/web", "--to", "198.18.3.2:8080", "--prometheus", "x"}, 2, []string{"the canary is a backend Service's name"}},
		{"route rollout two routes", []string{"route", "rollout", "--httproute", "shop/web", "--tcproute", "shop/web", "--to", "web-v2", "--prometheus", "x"}, 2, []string{"give one route"}},
		{"route rollout httproute and vip", []string{"route", "rollout", "--httproute", "shop/web", vip, "--to", "web-v2", "--prometheus", "x"}, 2, []string{"--httproute names the route", "drop"}},
		{"route rollout httproute with cgroup", []string{"route", "rollout", "--httproute", "shop/web", "--to", "web-v2", "--prometheus", "x", "--cgroup", "/x"}, 2, []string{"--cgroup is for a pod's route"}},
		{"route rollout pod with prometheus", with("route", "rollout", vip, "--to", "198.18.3.2:8080", "--prometheus", "x"), 2, []string{"--prometheus is for --httproute/--tcproute"}},
		{"route rollout no cgroup", []string{"route", "rollout", vip, "--to", "198.18.3.2:8080"}, 2, []string{"--cgroup is required", "pass the pod's cgroup v2 directory"}},

		{"webhook no certificate", []string{"webhook", "--tls-dir", "/nonexistent"}, 2, []string{"--tls-dir /nonexistent has no tls.crt", "create the Secret with 'sluice webhook certs | kubectl apply -f -'"}},
		{"webhook unknown subcommand", []string{"webhook", "cert"}, 2, []string{`unknown webhook subcommand "cert"`, "want certs"}},
		{"webhook log format", []string{"webhook", "--log-format", "xml"}, 2, []string{`log format "xml"`, "want text or json"}},
		{"webhook certs bad namespace", []string{"webhook", "certs", "--namespace", "Sluice_System"}, 2, []string{`--namespace "Sluice_System"`, "want a DNS label"}},
		{"webhook certs valid for 0", []string{"webhook", "certs", "--valid-for", "0s"}, 2, []string{"--valid-for 0s", "want a positive duration"}},
		{"webhook certs extra argument", []string{"webhook", "certs", "now"}, 2, []string{`unexpected argument "now"`, "every option is a flag"}},

		{"check unknown flag", []string{"check", "--cgroup", "/sys/fs/cgroup"}, 2, []string{"unknown flag -cgroup", "run 'sluice check --help'"}},
		{"check bad bool", []string{"check", "--json=2"}, 2, []string{`invalid boolean value "2" for -json`, "want true or false"}},
		{"check extra argument", []string{"check", "all"}, 2, []string{`unexpected argument "all"`, "every option is a flag"}},
	}
	// The cgroup2 mount itself and a cgroup below it that does not exist;
	// uninstall and status check them only after requireRoot, so not here.
	if mount, err := loader.Cgroup2Mount(); err == nil {
		missing := filepath.Join(mount, "sluice-badinput-no-such-pod")
		for _, c := range []struct {
			name string
			args []string
		}{
			{"install", []string{"install"}},
			{"run", []string{"run"}},
			{"route set", []string{"route", "set", vip, be}},
			{"route list", []string{"route", "list"}},
		} {
			tests = append(tests,
				tc{c.name + " root cgroup", append(c.args, "--cgroup", mount), 1, []string{"is the root of the cgroup v2 hierarchy", "pass the pod's own cgroup below it"}},
				tc{c.name + " no such cgroup", append(c.args, "--cgroup", missing), 1, []string{"cgroup " + missing + " does not exist", "create it first"}})
		}
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tt.args, &stdout, &stderr)
			msg := stderr.String()
			if code != tt.code {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tt.code, msg)
			}
			prefix := "sluice " + tt.args[0] + ": "
			if tt.name == "unknown command" {
				prefix = "sluice: "
			}
			if strings.Count(msg, "\n") != 1 || !strings.HasSuffix(msg, "\n") || !strings.HasPrefix(msg, prefix) {
				t.Errorf("want one line %q on stderr, got %q", prefix+"...", msg)
			}
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("stderr %q does not say %q", msg, w)
				}
			}
			if stdout.Len() > 0 {
				t.Errorf("unexpected stdout %q", stdout.String())
			}
		})
	}
}
