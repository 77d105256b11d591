package antispoof

// SetBetweenRoutedReads makes syncRouted run f between its reads of the chains and of the
// links, until restore.
func SetBetweenRoutedReads(f func()) (restore func()) {
	old := betweenRoutedReads
	betweenRoutedReads = f
	return func() { betweenRoutedReads = old }
}
