pytest_plugins = ["tests.emulators.fixtures", "tests.postgres"]
