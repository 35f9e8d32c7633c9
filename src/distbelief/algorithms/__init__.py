"""The training algorithms: each a package (config, messages, driver, actors)."""
