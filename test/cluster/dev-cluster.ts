/**
 * `npm run dev:cluster`: the test cluster, by hand. Builds what is missing, starts it, prints
 * the KUBECONFIG to export, and on Ctrl-C (or SIGTERM, or when one of its processes dies) stops
 * everything it started and removes what its pods left. Needs root.
 */
import { startCluster, stopCluster, watchCluster } from './cluster.js';
import { API_PORT, LOGS, NODE_IP } from './layout.js';

function stop(exitCode: number): void {
  try {
    stopCluster();
  } catch (error) {
    console.error(`dev:cluster: stopping failed: ${(error as Error).message}`);
    exitCode = 1;
  }
  process.exit(exitCode);
}

process.on('SIGINT', () => stop(0));
process.on('SIGTERM', () => stop(0));
try {
  const kubeconfig = await startCluster();
  console.log(`Kubernetes is running at https://${NODE_IP}:${API_PORT} (logs in ${LOGS})

  export KUBECONFIG=${kubeconfig}

Try it:  node bin/run.js ls -A
         ~/.cache/mirrord-dev/k8s-*/bin/kubectl get pods -A

Ctrl-C stops the cluster and removes everything it made.`);
  watchCluster((message) => {
    console.error(`dev:cluster: ${message}`);
    stop(1);
  });
} catch (error) {
  console.error(`dev:cluster: ${(error as Error).message}`);
  process.exitCode = 1;
}
