"""Operations: metrics, drift detection, Prometheus configuration, alert rules, dashboards."""
