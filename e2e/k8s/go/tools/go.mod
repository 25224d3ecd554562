// Small helpers of the e2e/k8s test cluster (standard library only).
module mars.test/e2e/k8s/tools

go 1.26.0
