// Validates the custom resources in rendered manifests against the schemas cert-manager and
// the Prometheus Operator publish (through @kubernetes-models). kubernetes-validate checks
// the built-in kinds and skips these; a custom kind with no schema here fails, so nothing in
// the deploy kit goes unchecked. Usage: node crds.mjs FILE... (exit 1 on any finding).
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "cert-manager.io/v1 Certificate": Certificate,
  "cert-manager.io/v1 Issuer": Issuer,
  "monitoring.coreos.com/v1 ServiceMonitor": ServiceMonitor,
};
// Kinds of the Kubernetes API itself: kubernetes-validate's job.
const builtin = /^(v1|apps\/v1|policy\/v1|networking\.k8s\.io\/v1|rbac\.authorization\.k8s\.io\/v1|batch\/v1|autoscaling\/v2) /;

let failures = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) {
      console.log(`${file}: ${doc.errors[0].message}`);
      failures++;
      continue;
    }
    const obj = doc.toJS();
    if (!obj) continue;
    const kind = `${obj.apiVersion} ${obj.kind}`;
    const where = `${file}: ${kind} ${obj.metadata?.name}`;
    if (builtin.test(kind)) continue;
    const Model = models[kind];
    if (!Model) {
      console.log(`${where}: no schema for this custom kind`);
      failures++;
      continue;
    }
    try {
      new Model(obj).validate();
      checked++;
    } catch (e) {
      console.log(`${where}: ${e.message}`);
      failures++;
    }
  }
}
console.log(`${checked} custom resources valid, ${failures} findings`);
process.exit(failures ? 1 : 0);
