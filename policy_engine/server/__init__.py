"""Running an application under a policy: app assembly, endpoints, reload, load sampling."""
