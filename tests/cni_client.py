"""A tiny CNI runtime for tests: runs a conflist's plugins the way libcni does.

ADD runs the plugins in order, each getting the previous result as
`prevResult`; CHECK likewise with the cached ADD result; DEL runs them in
reverse. `runtimeConfig` is filled only for the capabilities a plugin declares.
"""

import json
import os
import subprocess


class CniPluginError(Exception):
    def __init__(self, plugin, rc, error, stderr):
        super().__init__(f"{plugin} failed ({rc}): {error} {stderr}")
        self.plugin, self.rc, self.error = plugin, rc, error


class ConflistRunner:
    def __init__(self, conflist, cni_path, preexec_fn=None):
        self.conflist = conflist
        self.cni_path = cni_path
        self.preexec_fn = preexec_fn

    def _conf(self, plugin, runtime_config, prev):
        conf = dict(plugin, name=self.conflist["name"], cniVersion=self.conflist["cniVersion"])
        caps = {k for k, v in plugin.get("capabilities", {}).items() if v}
        wanted = {k: v for k, v in (runtime_config or {}).items() if k in caps}
        if wanted:
            conf["runtimeConfig"] = wanted
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _exec(self, command, plugin, conf, container_id, netns, ifname, args):
        binary = next((os.path.join(d, plugin["type"]) for d in self.cni_path.split(":")
                       if os.access(os.path.join(d, plugin["type"]), os.X_OK)), None)
        assert binary, f"plugin {plugin['type']} not found in {self.cni_path}"
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
               "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
               "CNI_ARGS": args, "CNI_PATH": self.cni_path}
        proc = subprocess.run([binary], input=json.dumps(conf).encode(), env=env, capture_output=True,
                              preexec_fn=self.preexec_fn, timeout=60)
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        if proc.returncode != 0:
            raise CniPluginError(plugin["type"], proc.returncode, out, proc.stderr.decode(errors="replace"))
        return out

    def add(self, container_id, netns, ifname="eth0", runtime_config=None, args=""):
        result = None
        for plugin in self.conflist["plugins"]:
            result = self._exec("ADD", plugin, self._conf(plugin, runtime_config, result), container_id, netns,
                                ifname, args) or result
        return result

    def check(self, result, container_id, netns, ifname="eth0", runtime_config=None, args="", skip=()):
        for plugin in self.conflist["plugins"]:
            if plugin["type"] in skip:
                continue
            self._exec("CHECK", plugin, self._conf(plugin, runtime_config, result), container_id, netns, ifname, args)

    def delete(self, result, container_id, netns, ifname="eth0", runtime_config=None, args=""):
        for plugin in reversed(self.conflist["plugins"]):
            self._exec("DEL", plugin, self._conf(plugin, runtime_config, result), container_id, netns, ifname, args)
